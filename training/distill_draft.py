"""Train the embedded default draft against the default target (sequence-level distillation).

Reproducible: every phase is seeded and writes its config next to its output.

Phases (``--phase``):
  gen    Teacher data. For GSM8K *train* questions (seeded shuffle), build the eval prompt (8-shot CoT, plain
         or chat template, alternating) and record the target's own greedy continuation (``--gen-tokens``,
         EOS ignored, as the fixed-length protocol). Batched decoding over a shared, cached few-shot prefix.
         Appends to ``<work>/teacher.jsonl``; rerunning resumes where it stopped.
  gen-broad  Broad teacher data. Train-split prompts of every family in ``training/families.py``
         (GSM8K few-shot and chat, general chat requests, stdlib code completion and code requests, prose,
         HumanEval-style doctest prompts on original tasks),
         interleaved by weighted round-robin so any prefix of the run is balanced, each with the target's
         greedy continuation up to EOS / ``<|im_end|>`` or ``--gen-tokens`` (192). Batched same-family decoding
         (left-padded, KV cache, finished rows leave the batch). Shards of ~100 records in ``--out-dir``
         (default ``data/distill/teacher``) as ``<family>-<NNNN>.jsonl.gz``, rewritten atomically after each
         batch, plus ``gen_config.json``; rerunning skips keys already in the shards.
  check-batch  Compare gen-broad's batched decoding with unbatched ``generate`` on ``--check`` prompts per family.
  train  Draft: a Llama with the target's width, ``--layers`` layers initialised from evenly spaced target
         layers, and a *reduced vocabulary* (the ``--vocab`` most frequent target tokens of the teacher data
         plus one "unknown" id): its LM head is the matching rows of the target's tied embedding. Loss:
         cross-entropy on the teacher's greedy tokens (the target's argmax at each position, so it trains
         exactly what greedy acceptance measures), over the continuation only, with the few-shot prefix run
         once per step without gradient and shared by the batch. Checkpoints every ``--ckpt-every`` steps
         and resumes from the last checkpoint. ``--data broad`` trains on the gen-broad shards (one family per
         batch; families in turn, or drawn by ``--group-weighting sqrt|size``), re-reading them every
         ``--reload-every`` steps so that records a gen-broad run beside it writes join training;
         ``--init-from DIR`` warm-starts from an existing draft of the same depth, keeping its vocabulary and
         extending it with the most frequent new ids, then the lowest remaining ids, up to ``--vocab`` (new rows
         start from the target's embedding). Only labelled positions go through the LM head; ``--bf16`` runs
         the matmuls under CPU autocast (weights, optimizer state and loss in fp32). ``--kd-weight W``
         adds logit-level distillation: the target reads each batch online (no stored logits) and the loss
         mixes the greedy-token cross-entropy with the cross-entropy against the target's full next-token
         distribution over the draft's vocabulary, ``(1 - W) * CE + W * H(p_target, q_draft)``;
         ``--kd-prompt`` extends the soft term to the prompt tail's positions.
  export Write the final fp16 draft dir (weights, config, ``pearl_vocab.json``, tokenizer, ``distill_config.json``).
  shrink A smaller-vocabulary copy of the draft in ``--init-from`` (no training): the ``--vocab`` ids of its
         vocabulary that the teacher data uses most keep their rows; the rest are dropped (q = 0 there). Kept
         ids' logits are unchanged; the head gets cheaper, so the cost ratio c grows. Written to ``--out``.

Example (the committed draft): see models/README.md for the exact commands and timings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from collections import Counter
from pathlib import Path

import torch

from pearl_ray.evals.gsm8k import build_prompt, load_split
from pearl_ray.modeling.hf import VocabMap


def log(msg: str) -> None:
    print(f"[distill {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_target(target: str, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pearl_ray.modeling.default_pair import resolve_preset

    path = resolve_preset(target) or target
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(device)
    return model, tok, path


def common_prefix_len(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


def prefill_batch(model, prompts: list[list[int]], pad_id: int):
    """Run a batch of prompts: their common prefix once (shared through the KV cache), then the suffixes
    left-padded after it with an attention mask and per-row positions. Returns (cache, attention mask,
    last position per row, next-token logits per row)."""
    from transformers import DynamicCache

    b = len(prompts)
    dev = model.device
    plen = max(0, common_prefix_len(prompts) - 1)  # every row keeps >= 1 suffix token
    cache = DynamicCache(config=model.config)
    if plen:
        model(input_ids=torch.tensor([prompts[0][:plen]], device=dev), past_key_values=cache, use_cache=True,
              logits_to_keep=1)
        cache.batch_repeat_interleave(b)
    suffixes = [p[plen:] for p in prompts]
    width = max(len(s) for s in suffixes)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    smask = torch.zeros((b, width), dtype=torch.long)
    for i, s in enumerate(suffixes):
        ids[i, width - len(s):] = torch.tensor(s)
        smask[i, width - len(s):] = 1
    mask = torch.cat([torch.ones((b, plen), dtype=torch.long), smask], dim=1).to(dev)
    pos = (plen + torch.cumsum(smask, dim=1) - 1).clamp(min=plen).to(dev)
    out = model(input_ids=ids.to(dev), attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    return cache, mask, pos[:, -1], out.logits[:, -1]


@torch.inference_mode()
def batched_greedy(model, prompts: list[list[int]], num_tokens: int, pad_id: int) -> list[list[int]]:
    """Greedy continuations for prompts sharing a prefix: prefix once, suffixes left-padded after it."""
    b = len(prompts)
    cache, mask, last_pos, logits = prefill_batch(model, prompts, pad_id)
    nxt = logits.argmax(-1)
    gen = [nxt]
    for _ in range(num_tokens - 1):
        mask = torch.cat([mask, mask.new_ones((b, 1))], dim=1)
        last_pos = last_pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                    past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1)
        gen.append(nxt)
    return torch.stack(gen, dim=1).tolist()


def phase_gen(args) -> None:
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, tok, path = load_target(args.target)
    data = load_split("train")
    order = list(range(len(data)))
    random.Random(args.seed).shuffle(order)
    order = order[: args.num_questions]
    out_path = work / "teacher.jsonl"
    done = set()
    if out_path.exists():
        done = {json.loads(line)["idx"] for line in out_path.read_text().splitlines() if line.strip()}
    (work / "gen_config.json").write_text(json.dumps(vars(args) | {"target_path": path}, indent=2))
    todo = [i for i in order if i not in done]
    log(f"gen: {len(done)} done, {len(todo)} to go, batch {args.batch}")
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    t0 = time.time()
    with open(out_path, "a") as f:
        for start in range(0, len(todo), args.batch):
            batch = todo[start: start + args.batch]
            chat = args.chat and (start // args.batch) % 2 == 1  # alternate plain and chat batches
            texts = [build_prompt(data[i]["question"], chat=chat, tokenizer=tok) for i in batch]
            prompts = [tok(t, add_special_tokens=True)["input_ids"] for t in texts]
            conts = batched_greedy(model, prompts, args.gen_tokens, pad)
            for i, p, c in zip(batch, prompts, conts):
                f.write(json.dumps({"idx": i, "chat": chat, "prompt_ids": p, "continuation_ids": c}) + "\n")
            f.flush()
            n = start + len(batch)
            log(f"gen: {n}/{len(todo)} questions, {(time.time() - t0) / n:.2f} s/question")


# ---------------------------------------------------------------------------------------------------------
# gen-broad: the target's greedy continuations on prompts of many families (training/families.py).
BROAD_WEIGHTS = {"gsm8k_chat": 25, "chat": 25, "code_completion": 15, "code_chat": 15, "text": 10,
                 "gsm8k_fewshot": 10, "code_doctest": 15}
DEFAULT_OUT_DIR = Path(__file__).resolve().parent.parent / "data" / "distill" / "teacher"
SHARD_SUFFIX = ".jsonl.gz"


def stop_token_ids(model, tok) -> list[int]:
    """The generation config's EOS ids plus ``<|im_end|>`` when the vocabulary has it."""
    eos = model.generation_config.eos_token_id
    ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    im_end = tok.get_vocab().get("<|im_end|>")
    if im_end is not None:
        ids.append(im_end)
    return sorted(set(ids))


@torch.inference_mode()
def greedy_until_stop(model, prompts: list[list[int]], max_tokens: int, pad_id: int,
                      stop_ids: list[int]) -> list[tuple[list[int], str]]:
    """Batched greedy continuations, each ending at its first stop id (kept) or after ``max_tokens``.

    The prompts' common prefix runs once and is shared through the KV cache; the suffixes follow it
    left-padded, with an attention mask and per-row positions. A row that stops leaves the batch (its cache
    rows are dropped); decoding ends when no row is left. Returns ``(continuation, "eos" | "length")``."""
    b = len(prompts)
    cache, mask, last_pos, logits = prefill_batch(model, prompts, pad_id)
    nxt = logits.argmax(-1)
    stops = set(stop_ids)
    conts: list[list[int]] = [[] for _ in range(b)]
    finish = ["length"] * b
    alive = list(range(b))  # original row of each current batch row
    while True:
        keep = []
        for j, (row, tid) in enumerate(zip(alive, nxt.tolist())):
            conts[row].append(tid)
            if tid in stops:
                finish[row] = "eos"
            elif len(conts[row]) < max_tokens:
                keep.append(j)
        if not keep:
            break
        if len(keep) < len(alive):
            sel = torch.tensor(keep, device=nxt.device)
            cache.batch_select_indices(sel)
            mask, last_pos, nxt = mask[sel], last_pos[sel], nxt[sel]
            alive = [alive[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        last_pos = last_pos + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last_pos[:, None],
                    past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1)
    return list(zip(conts, finish))


def broad_plan(families: dict[str, list[dict]], weights: dict[str, float], seed: int) -> list[dict]:
    """Interleave the families' (already seeded) lists by smooth weighted round-robin, so that every prefix
    of the plan holds each family in proportion to its weight until that family runs out."""
    order = sorted(families)
    random.Random(seed).shuffle(order)  # seeded tie order
    pos = {f: 0 for f in order}
    credit = {f: 0.0 for f in order}
    plan = []
    while True:
        active = [f for f in order if pos[f] < len(families[f])]
        if not active:
            return plan
        total = sum(weights[f] for f in active)
        for f in active:
            credit[f] += weights[f]
        pick = max(active, key=lambda f: credit[f])  # first in tie order wins ties
        credit[pick] -= total
        plan.append(families[pick][pos[pick]])
        pos[pick] += 1


def plan_batches(items: list[dict], lengths: list[int], batch: int, window: int) -> list[list[int]]:
    """Group plan positions into same-family batches: each family's items, in plan order, are cut into windows
    of ``window`` batches, sorted by prompt length inside the window (less padding), and chunked. The k-th
    batch of a window runs at the plan position of the window's k-th unsorted chunk, so the run stays as
    balanced across families as the plan."""
    by_family: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_family.setdefault(it["family"], []).append(i)
    keyed = []
    for idx in by_family.values():
        span = batch * window
        for w in range(0, len(idx), span):
            win = idx[w: w + span]
            ordered = sorted(win, key=lambda i: (lengths[i], i))
            for k in range(0, len(ordered), batch):
                keyed.append((win[k], ordered[k: k + batch]))
    return [b for _, b in sorted(keyed)]


class ShardStore:
    """Teacher records as gzip JSON-lines shards ``<family>-<NNNN>.jsonl.gz`` in one directory.

    Each family has one open shard, rewritten atomically (tmp file, then rename) after every batch, so an
    interruption loses at most the batch in flight; a shard is closed at ``shard_size`` records. On start
    the directory is scanned: its keys count as done and each family's last shard, if not full, stays open."""

    def __init__(self, out_dir: Path, shard_size: int = 100):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.shard_size = shard_size
        self.done: set[tuple[str, str]] = set()
        self.counts: Counter = Counter()
        self.finish: dict[str, Counter] = {}
        self.open: dict[str, tuple[int, list[dict]]] = {}
        for tmp in self.dir.glob("*.tmp"):
            tmp.unlink()
        for path in sorted(self.dir.glob("*" + SHARD_SUFFIX)):
            family, num = path.name[: -len(SHARD_SUFFIX)].rsplit("-", 1)
            records = read_shard(path)
            for r in records:
                self._count(r)
            if int(num) >= self.open.get(family, (-1, []))[0]:
                self.open[family] = (int(num), records)
        for family, (num, records) in list(self.open.items()):
            if len(records) >= shard_size:
                self.open[family] = (num + 1, [])

    def _count(self, r: dict) -> None:
        self.done.add((r["family"], r["key"]))
        self.counts[r["family"]] += 1
        self.finish.setdefault(r["family"], Counter())[r["finish"]] += 1

    def add(self, family: str, records: list[dict]) -> None:
        num, open_records = self.open.get(family, (0, []))
        for r in records:
            open_records.append(r)
            self._count(r)
            if len(open_records) >= self.shard_size:
                self._write(family, num, open_records)
                num, open_records = num + 1, []
        if open_records:
            self._write(family, num, open_records)
        self.open[family] = (num, open_records)

    def _write(self, family: str, num: int, records: list[dict]) -> None:
        import gzip

        path = self.dir / f"{family}-{num:04d}{SHARD_SUFFIX}"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            for r in records:
                gz.write((json.dumps(r, separators=(",", ":")) + "\n").encode())
        os.replace(tmp, path)


def read_shard(path: Path) -> list[dict]:
    import gzip

    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def broad_items(tok, families: list[str], split: str, seed: int) -> dict[str, list[dict]]:
    from training.families import build_family

    return {f: build_family(f, tok, split, seed) for f in families}


def phase_gen_broad(args) -> None:
    torch.set_num_threads(args.threads)
    gen_tokens = args.gen_tokens
    families = args.families.split(",") if args.families else list(BROAD_WEIGHTS)
    store = ShardStore(Path(args.out_dir))
    model, tok, path = load_target(args.target, args.device)
    stops = stop_token_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    t0 = time.time()
    plan = broad_plan(broad_items(tok, families, "train", args.seed), BROAD_WEIGHTS, args.seed)
    if args.limit:
        plan = plan[: args.limit]
    todo = [it for it in plan if (it["family"], it["key"]) not in store.done]
    prompts = [tok(it["text"], add_special_tokens=True)["input_ids"] for it in todo]
    too_long = Counter(it["family"] for it, p in zip(todo, prompts) if len(p) > args.max_prompt_tokens)
    keep = [i for i, p in enumerate(prompts) if len(p) <= args.max_prompt_tokens]
    todo, prompts = [todo[i] for i in keep], [prompts[i] for i in keep]
    batches = plan_batches(todo, [len(p) for p in prompts], args.batch, args.window)
    log(f"gen-broad: plan {len(plan)} prompts ({time.time() - t0:.1f} s to build), {len(store.done)} done, "
        f"{len(todo)} to go in {len(batches)} batches of <= {args.batch}; skipped as too long: {dict(too_long)}; "
        f"stop ids {stops}; out {store.dir}")

    cfg_path = store.dir / "gen_config.json"
    runs = json.loads(cfg_path.read_text()).get("runs", []) if cfg_path.exists() else []
    run = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "args": dict(vars(args)),
           "records": 0, "seconds": 0.0, "new_tokens": 0, "per_family": {},
           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
    runs.append(run)

    def write_config() -> None:
        run["s_per_record"] = round(run["seconds"] / max(1, run["records"]), 3)
        run["tokens_per_s"] = round(run["new_tokens"] / max(1e-9, run["seconds"]), 2)
        for fam in run["per_family"].values():
            fam["s_per_record"] = round(fam["seconds"] / max(1, fam["records"]), 3)
        cfg = {"target": args.target, "target_path": path, "seed": args.seed, "gen_tokens": gen_tokens,
               "max_prompt_tokens": args.max_prompt_tokens, "stop_ids": stops, "weights": BROAD_WEIGHTS,
               "record": {"family": "prompt family (training/families.py)", "key": "item key in its family",
                          "prompt_ids": "target token ids of the prompt (add_special_tokens=True)",
                          "continuation_ids": "greedy target tokens, the stop token included when finish='eos'",
                          "finish": "'eos' (a stop id) or 'length' (gen_tokens reached)"},
               "counts": dict(sorted(store.counts.items())),
               "finish": {f: dict(c) for f, c in sorted(store.finish.items())},
               "runs": runs}
        tmp = cfg_path.with_name(cfg_path.name + ".tmp")
        tmp.write_text(json.dumps(cfg, indent=1) + "\n")
        os.replace(tmp, cfg_path)

    write_config()
    start, deadline = time.time(), time.time() + args.max_minutes * 60
    for bi, idx in enumerate(batches):
        if time.time() > deadline:
            log(f"gen-broad: time budget of {args.max_minutes} min reached")
            break
        family = todo[idx[0]]["family"]
        tb = time.time()
        outs = greedy_until_stop(model, [prompts[i] for i in idx], gen_tokens, pad, stops)
        dt = time.time() - tb
        records = [{"family": family, "key": todo[i]["key"], "prompt_ids": prompts[i], "continuation_ids": c,
                    "finish": fin} for i, (c, fin) in zip(idx, outs)]
        store.add(family, records)
        ntok = sum(len(c) for c, _ in outs)
        fam = run["per_family"].setdefault(family, {"records": 0, "seconds": 0.0, "new_tokens": 0})
        for d in (run, fam):
            d["records"] += len(idx)
            d["seconds"] = round(d["seconds"] + dt, 2)
            d["new_tokens"] += ntok
        write_config()
        log(f"gen-broad: batch {bi + 1}/{len(batches)} {family} x{len(idx)} {dt:.1f} s, {ntok} tokens "
            f"({sum(f == 'eos' for _, f in outs)} eos) | run: {run['records']} records, "
            f"{run['seconds'] / run['records']:.2f} s/record, {run['new_tokens'] / run['seconds']:.1f} tok/s "
            f"| total {sum(store.counts.values())}")
    log(f"gen-broad: stopped after {(time.time() - start) / 60:.1f} min; counts {dict(store.counts)}")


def phase_check_batch(args) -> None:
    """Batched (this file's decoder) vs unbatched (``model.generate``, greedy) continuations, token for token,
    on the first ``--check`` train prompts of each family; writes ``batch_check.json`` in ``--out-dir``."""
    torch.set_num_threads(args.threads)
    gen_tokens = args.gen_tokens
    families = args.families.split(",") if args.families else list(BROAD_WEIGHTS)
    model, tok, path = load_target(args.target)
    stops = stop_token_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    report = {"target_path": path, "gen_tokens": gen_tokens, "batch": args.batch, "families": {}}
    for family, items in broad_items(tok, families, "train", args.seed).items():
        prompts = [tok(it["text"], add_special_tokens=True)["input_ids"] for it in items[: args.check]]
        batched = []
        for s in range(0, len(prompts), args.batch):
            batched += greedy_until_stop(model, prompts[s: s + args.batch], gen_tokens, pad, stops)
        rows = []
        for p, (cont, fin) in zip(prompts, batched):
            ref = model.generate(torch.tensor([p]), attention_mask=torch.ones((1, len(p)), dtype=torch.long),
                                 do_sample=False, max_new_tokens=gen_tokens, eos_token_id=stops,
                                 pad_token_id=pad)[0, len(p):].tolist()
            first = next((i for i, (a, b) in enumerate(zip(cont, ref)) if a != b), None)
            if first is None and len(cont) != len(ref):
                first = min(len(cont), len(ref))
            rows.append({"match": first is None, "first_diff": first, "len": len(cont), "ref_len": len(ref)})
        n_match = sum(r["match"] for r in rows)
        report["families"][family] = {"prompts": len(rows), "identical": n_match, "rows": rows}
        log(f"check-batch: {family}: {n_match}/{len(rows)} identical; first differences at "
            f"{[r['first_diff'] for r in rows if not r['match']]}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_check.json").write_text(json.dumps(report, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------------
def build_draft(target_model, layers: list[int], draft_to_target: list[int]):
    from transformers import LlamaConfig, LlamaForCausalLM

    tc = target_model.config
    cfg = LlamaConfig(**{k: v for k, v in tc.to_dict().items() if k in LlamaConfig().to_dict()})
    cfg.num_hidden_layers = len(layers)
    cfg.vocab_size = len(draft_to_target) + 1  # + "unknown" input id
    cfg.tie_word_embeddings = True
    cfg.bos_token_id = cfg.eos_token_id = cfg.pad_token_id = None
    draft = LlamaForCausalLM(cfg)
    ids = torch.tensor(draft_to_target)
    with torch.no_grad():
        emb = target_model.model.embed_tokens.weight
        draft.model.embed_tokens.weight[: len(ids)] = emb[ids]
        draft.model.embed_tokens.weight[len(ids)] = emb.mean(0)
        for j, li in enumerate(layers):
            draft.model.layers[j].load_state_dict(target_model.model.layers[li].state_dict())
        draft.model.norm.load_state_dict(target_model.model.norm.state_dict())
    draft.tie_weights()
    return draft


def warm_start(draft, init_dir: str, draft_to_target: list[int]) -> None:
    """Copy an existing reduced-vocabulary draft (same width and depth) into ``draft``: its layers and norm,
    and the embedding rows of the target ids both vocabularies share (plus its "unknown" row). Rows of
    ids new to ``draft_to_target`` keep their target-embedding initialisation."""
    from safetensors.torch import load_file

    old_map = json.loads((Path(init_dir) / "pearl_vocab.json").read_text())["draft_to_target"]
    weights = {k: v.float() for k, v in load_file(str(Path(init_dir) / "model.safetensors")).items()}
    old_emb = weights.pop("model.embed_tokens.weight")
    weights.pop("lm_head.weight", None)
    missing, unexpected = draft.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"model.embed_tokens.weight", "lm_head.weight"}:
        raise SystemExit(f"error: {init_dir} does not fit this draft shape (missing {missing}, unexpected {unexpected})")
    row = {t: i for i, t in enumerate(old_map)}
    with torch.no_grad():
        emb = draft.model.embed_tokens.weight
        for j, t in enumerate(draft_to_target):
            if t in row:
                emb[j] = old_emb[row[t]]
        emb[len(draft_to_target)] = old_emb[len(old_map)]
    draft.tie_weights()
    log(f"train: warm start from {init_dir}: {sum(t in row for t in draft_to_target)} of {len(draft_to_target)} "
        f"vocabulary rows carried over")


def load_teacher(args) -> list[dict]:
    """Teacher records as ``{"idx", "group", "prompt_ids", "continuation_ids"}``: the GSM8K set in
    ``<work>/teacher.jsonl`` (``--data gsm8k``, groups plain/chat) or the broad shards in ``--out-dir``
    (``--data broad``, one group per family; ``idx`` is a stable hash of family and key)."""
    if args.data == "gsm8k":
        rows = [json.loads(line) for line in (Path(args.work) / "teacher.jsonl").read_text().splitlines() if line.strip()]
        return [{"idx": r["idx"], "group": "chat" if r["chat"] else "plain", "prompt_ids": r["prompt_ids"],
                 "continuation_ids": r["continuation_ids"]} for r in rows]
    import hashlib

    out = []
    for path in sorted(Path(args.out_dir).glob(f"*{SHARD_SUFFIX}")):
        for r in read_shard(path):
            h = int(hashlib.md5(f"{r['family']}:{r['key']}".encode()).hexdigest()[:12], 16)
            out.append({"idx": h, "group": r["family"], "prompt_ids": r["prompt_ids"],
                        "continuation_ids": r["continuation_ids"]})
    if not out:
        raise SystemExit(f"error: no teacher shards in {args.out_dir}: run --phase gen-broad first")
    return out


def id_counts(records: list[dict]) -> Counter:
    """How often each target id occurs in the records' prompts and continuations."""
    counts = Counter()
    for r in records:
        counts.update(r["continuation_ids"])
        counts.update(r["prompt_ids"])
    return counts


def extend_vocab(base: list[int], records: list[dict], size: int, eos_ids: list[int], vocab_total: int) -> list[int]:
    """``base`` plus the most frequent other ids of ``records`` (then EOS ids), then the lowest remaining ids
    (byte-level BPE numbers its merges roughly by frequency), up to ``size``. Filling matters on held-out
    prompts: the target copies rare words from its prompt, and an id outside the draft's vocabulary is a
    certain rejection."""
    counts = id_counts(records)
    chosen = list(dict.fromkeys(list(base) + [e for e in eos_ids if e not in base]))
    have = set(chosen)
    for t, _ in counts.most_common():
        if len(chosen) >= size:
            break
        if t not in have:
            chosen.append(t)
            have.add(t)
    fill = (t for t in range(vocab_total) if t not in have)
    while len(chosen) < min(size, vocab_total):
        chosen.append(next(fill))
    return sorted(chosen)


def pick_vocab(records: list[dict], size: int, eos_ids: list[int], vocab_total: int) -> list[int]:
    """The ``size`` target ids the draft can propose: every id seen in the teacher data (most frequent
    first), then the lowest remaining ids (byte-level BPE numbers its merges roughly by frequency)."""
    counts = id_counts(records)
    chosen = [t for t, _ in counts.most_common(size)]
    seen = set(chosen) | set(eos_ids)
    chosen = chosen[: size - len(set(eos_ids) - set(chosen))] + [e for e in eos_ids if e not in chosen]
    seen = set(chosen)
    fill = (t for t in range(vocab_total) if t not in seen)
    while len(chosen) < size:
        chosen.append(next(fill))
    return sorted(chosen)


def batch_loss(draft, batch: list[dict], in_map: torch.Tensor, train_mode: bool,
               bf16: bool = False, teacher=None, kd_cols: torch.Tensor | None = None,
               kd_weight: float = 0.0, kd_prompt: bool = False) -> tuple[torch.Tensor, float]:
    """Loss and argmax agreement on the continuation tokens of ``batch`` (target ids mapped by ``in_map``).
    ``bf16``: matmuls under CPU autocast to bfloat16 (weights, optimizer and the loss stay fp32).

    Logit-level distillation (``teacher`` = the target, ``kd_weight`` > 0): the target reads the same
    sequences without gradient and the loss becomes ``(1 - w) * CE(greedy token) + w * H(p_T, q)``, where
    ``H(p_T, q) = -sum_v p_T(v) log q(v)`` over the draft's vocabulary (``kd_cols`` = its target ids; the
    target's mass outside it cannot be matched and is left out). ``kd_prompt``: the soft term also covers
    the prompt tail's positions (the user's text, which has no greedy label but does have the target's
    distribution), not only the continuation."""
    # Shared few-shot prefix without gradient, then prompt tails + continuations with gradient.
    from transformers import DynamicCache

    unk = int(in_map.max())
    prompts = [r["prompt_ids"] for r in batch]
    plen = common_prefix_len(prompts) - 1
    plen = max(1, min(plen, min(len(p) for p in prompts) - 1))
    seqs = [r["prompt_ids"][plen:] + r["continuation_ids"] for r in batch]
    width = max(len(s) for s in seqs)
    b = len(batch)
    raw = torch.zeros((b, width), dtype=torch.long)
    smask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), -100, dtype=torch.long)
    for i, (r, s) in enumerate(zip(batch, seqs)):
        off = width - len(s)
        raw[i, off:] = torch.tensor(s)
        smask[i, off:] = 1
        cont_start = off + len(r["prompt_ids"]) - plen  # index of first continuation token
        tgt = torch.tensor(s[1:] + [-100])  # next-token targets, in target ids
        lab = torch.where(tgt >= 0, in_map[tgt.clamp(min=0)], torch.full_like(tgt, -100))
        lab[lab == unk] = -100  # the draft cannot emit tokens outside its vocabulary
        lab[: cont_start - 1 - off] = -100  # loss on continuation tokens only (and the first one)
        labels[i, off:] = lab
    ids = in_map[raw]
    mask = torch.cat([torch.ones((b, plen), dtype=torch.long), smask], dim=1)
    pos = (plen + torch.cumsum(smask, dim=1) - 1).clamp(min=plen)
    valid = labels != -100
    use_kd = teacher is not None and kd_weight > 0
    head_rows = valid
    if use_kd and kd_prompt:  # every real position with a next token (the last column has none)
        head_rows = smask.bool().clone()
        head_rows[:, -1] = False
    prefix = torch.tensor([prompts[0][:plen]])
    dev = draft.device  # built on the CPU, moved to the model's device once
    ids, raw, mask, pos, labels, valid, head_rows = (t.to(dev) for t in (ids, raw, mask, pos, labels, valid, head_rows))
    prefix_draft, prefix = in_map[prefix].to(dev), prefix.to(dev)

    def run(model, input_ids, prefix_ids, grad: bool):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=prefix_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(b)
        with torch.set_grad_enabled(grad), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            hidden = model.model(input_ids=input_ids, attention_mask=mask, position_ids=pos,
                                 past_key_values=cache, use_cache=True).last_hidden_state
            # The LM head only where there is a loss: with a large vocabulary the head is most of a step's cost.
            return model.lm_head(hidden[head_rows]).float()

    logits = run(draft, ids, prefix_draft, train_mode)[:, :unk]  # the "unknown" id is input-only
    sel = valid[head_rows]  # rows of ``logits`` with a greedy label
    target_ids = labels[valid]
    hard = (torch.nn.functional.cross_entropy(logits[sel], target_ids) if len(target_ids)
            else logits.sum() * 0.0)
    loss = hard
    if use_kd:
        with torch.no_grad():
            p_t = torch.softmax(run(teacher, raw, prefix, False), dim=-1)[:, kd_cols.to(dev)]
        soft = -(p_t * torch.log_softmax(logits, dim=-1)).sum(-1).mean() if len(logits) else logits.sum() * 0.0
        loss = (1 - kd_weight) * hard + kd_weight * soft
    acc = float((logits[sel].argmax(-1) == target_ids).float().mean()) if len(target_ids) else 0.0
    return loss, acc


def join_new_records(records: list[dict], known: set[int], train_groups: list[list[dict]]) -> int:
    """Add the records of ``records`` not seen before (by ``idx``) to their family's training group (a new
    family gets a new group, groups stay sorted by name); validation indices (every 25th) stay out. Updates
    ``known``; returns how many joined."""
    fresh = [r for r in records if r["idx"] not in known]
    known |= {r["idx"] for r in fresh}
    fresh = [r for r in fresh if r["idx"] % 25 != 0]
    for r in fresh:
        group = next((g for g in train_groups if g[0]["group"] == r["group"]), None)
        if group is None:
            train_groups.append([r])
            train_groups.sort(key=lambda g: g[0]["group"])
        else:
            group.append(r)
    return len(fresh)


def pick_group(groups: list[list[dict]], step: int, weighting: str, rng: random.Random) -> list[dict]:
    """The family a step's batch comes from: ``equal`` takes them in turn; ``sqrt`` and ``size`` draw one with
    probability proportional to the square root of its record count, or to the count (large families such as
    chat then get more steps and small ones, such as 8-shot GSM8K, are not memorised)."""
    if weighting == "equal":
        return groups[step % len(groups)]
    sizes = [len(g) for g in groups]
    weights = [s ** 0.5 for s in sizes] if weighting == "sqrt" else sizes
    return rng.choices(groups, weights=weights)[0]


def phase_train(args) -> None:
    if not 0.0 <= args.kd_weight <= 1.0:
        raise SystemExit(f"error: --kd-weight must be in [0, 1], got {args.kd_weight}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    records = load_teacher(args)
    # Validation records are fixed by index (every 25th), so a resumed run with more data keeps them out.
    val = [r for r in records if r["idx"] % 25 == 0][: args.val_questions]
    if not val:  # tiny runs: hold out the first few records instead
        val = records[: max(1, min(args.val_questions, len(records) // 3))]
    val_ids = {r["idx"] for r in val}
    train = [r for r in records if r["idx"] not in val_ids]
    groups = sorted({r["group"] for r in records})
    val_groups = [g for g in ([r for r in val if r["group"] == name] for name in groups) if g]
    train_groups = [g for g in ([r for r in train if r["group"] == name] for name in groups) if g]
    log(f"train: {len(train)} training and {len(val)} validation records in groups {groups}")
    target, tok, tpath = load_target(args.target)
    eos = target.generation_config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    ckpt = work / "ckpt.pt"
    layers = [int(x) for x in args.layers.split(",")]
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location="cpu")
        draft_to_target = state["draft_to_target"]
        draft = build_draft(target, layers, draft_to_target)
        draft.load_state_dict(state["model"])
        step = state["step"]
        log(f"train: resumed from step {step}")
    elif args.init_from:
        base = json.loads((Path(args.init_from) / "pearl_vocab.json").read_text())["draft_to_target"]
        draft_to_target = extend_vocab(base, train, args.vocab, eos_ids, len(tok))
        draft = build_draft(target, layers, draft_to_target)
        warm_start(draft, args.init_from, draft_to_target)
        step, state = 0, None
    else:
        draft_to_target = pick_vocab(train, args.vocab, eos_ids, len(tok))
        draft = build_draft(target, layers, draft_to_target)
        step, state = 0, None
    teacher = None
    if args.kd_weight > 0:  # logit-level distillation reads the target every step
        teacher = target.eval().requires_grad_(False).to(args.device)
    else:
        del target
    draft.to(args.device)
    kd_cols = torch.tensor(draft_to_target)
    in_map = VocabMap(len(tok), draft_to_target, torch.device("cpu")).in_map  # target id -> draft input id
    opt = torch.optim.AdamW(draft.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    if args.time_schedule and state is not None:
        raise SystemExit("error: --time-schedule runs are not resumable (their schedule follows the clock); "
                         f"remove {ckpt} or drop --time-schedule")
    if state is not None and "opt" in state:
        opt.load_state_dict(state["opt"])
    cfg_out = vars(args) | {"target_path": tpath, "num_train": len(train), "num_val": len(val),
                            "draft_vocab": len(draft_to_target)}
    (work / "train_config.json").write_text(json.dumps(cfg_out, indent=2))

    def evaluate() -> tuple[float, float]:
        draft.eval()
        losses, accs = [], []
        for group in val_groups:  # one group per batch: a shared prompt prefix runs once
            for i in range(0, len(group), args.batch):
                loss, acc = batch_loss(draft, group[i: i + args.batch], in_map, False, args.bf16)
                losses.append(float(loss))
                accs.append(acc)
        draft.train()
        return sum(losses) / len(losses), sum(accs) / len(accs)

    vl = va = None  # the last evaluation of this run
    if step == 0:
        vl, va = evaluate()
        log(f"train: step 0 val loss {vl:.3f} val token agreement {va:.3f}")
    draft.train()
    t0, deadline, first_step = time.time(), time.time() + args.max_minutes * 60, step

    def progress() -> float:
        """Fraction of the schedule done: by steps, or with ``--time-schedule`` by steps or the clock, whichever
        is further (a run on a borrowed machine ends on time with its learning rate fully decayed)."""
        done = step / args.steps
        if args.time_schedule:
            done = max(done, (time.time() - t0) / (args.max_minutes * 60))
        return min(1.0, done)

    # Batches drawn by a generator re-seeded from (seed, step) so a resumed run sees the same data order.
    known = {r["idx"] for r in records}
    while step < args.steps and time.time() < deadline and progress() < 1.0:
        if args.data == "broad" and args.reload_every and step % args.reload_every == 0 and step > 0:
            # Teacher shards still being written by a gen-broad run beside this one (atomic replaces): new
            # records join training; held-out indices (every 25th) stay out, so validation is unchanged.
            joined = join_new_records(load_teacher(args), known, train_groups)
            if joined:
                log(f"train: step {step}: {joined} new teacher records joined training "
                    f"({sum(len(g) for g in train_groups)} in all)")
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * progress()))
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        rng = random.Random(args.seed * 100_003 + step)
        pool = pick_group(train_groups, step, args.group_weighting, rng)
        batch = rng.sample(pool, min(args.batch, len(pool)))
        loss, acc = batch_loss(draft, batch, in_map, True, args.bf16, teacher, kd_cols, args.kd_weight,
                               args.kd_prompt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.log_every == 0:
            log(f"train: step {step} loss {loss.item():.3f} agree {acc:.3f} lr {lr:.2e} "
                f"{(time.time() - t0) / max(1, step - first_step):.2f} s/step (this run)")
        if step % args.ckpt_every == 0 or step == args.steps:
            vl, va = evaluate()
            torch.save({"model": draft.state_dict(), "opt": opt.state_dict(), "step": step,
                        "draft_to_target": draft_to_target, "val_loss": vl, "val_agree": va}, ckpt.with_suffix(".tmp"))
            os.replace(ckpt.with_suffix(".tmp"), ckpt)
            log(f"train: checkpoint at step {step}: val loss {vl:.3f} val token agreement {va:.3f}")
    if step < args.steps:  # stopped early: by the clock (budget or time schedule)
        if step % args.ckpt_every != 0 or vl is None:  # else the loop has just checkpointed this step
            vl, va = evaluate()
            torch.save({"model": draft.state_dict(), "opt": opt.state_dict(), "step": step,
                        "draft_to_target": draft_to_target, "val_loss": vl, "val_agree": va}, ckpt)
        why = "end of the time schedule" if args.time_schedule and progress() >= 1.0 else "time budget"
        log(f"train: stopped at step {step} ({why}): val loss {vl:.3f} val agreement {va:.3f}")


def phase_export(args) -> None:
    from pearl_ray.modeling.resolve import VOCAB_MAP_FILE

    work, out = Path(args.work), Path(args.out)
    state = torch.load(work / "ckpt.pt", weights_only=False, map_location="cpu")
    target, tok, tpath = load_target(args.target)
    layers = [int(x) for x in args.layers.split(",")]
    draft = build_draft(target, layers, state["draft_to_target"])
    draft.load_state_dict(state["model"])
    draft = draft.to(torch.float16)
    eos = target.generation_config.eos_token_id
    draft.config.eos_token_id = eos
    draft.generation_config.eos_token_id = eos
    out.mkdir(parents=True, exist_ok=True)
    draft.save_pretrained(out)
    tok.save_pretrained(out)
    (out / VOCAB_MAP_FILE).write_text(json.dumps({"target_vocab_size": len(tok),
                                                  "draft_to_target": state["draft_to_target"]}))
    train_cfg = json.loads((work / "train_config.json").read_text())
    gen_file = work / "gen_config.json"
    if train_cfg.get("data") == "broad":
        gen_file = Path(train_cfg["out_dir"]) / "gen_config.json"
    cfg = {"gen": json.loads(gen_file.read_text()) if gen_file.exists() else None,
           "train": train_cfg,
           "final": {"step": state["step"], "val_loss": state["val_loss"], "val_token_agreement": state["val_agree"]}}
    (out / "distill_config.json").write_text(json.dumps(cfg, indent=2))
    log(f"export: wrote {out} (step {state['step']}, val agreement {state['val_agree']:.3f})")


def shrink_ids(draft_to_target: list[int], records: list[dict], size: int, eos_ids: list[int]) -> list[int]:
    """The ``size`` ids of ``draft_to_target`` that the teacher data uses most (continuations and prompts;
    EOS ids always kept; ties and unseen ids by the lower id, i.e. the more frequent BPE merge), sorted."""
    if not 0 < size <= len(draft_to_target):
        raise SystemExit(f"error: --vocab must be in [1, {len(draft_to_target)}] to shrink this draft, got {size}")
    counts = id_counts(records)
    keep = [e for e in eos_ids if e in set(draft_to_target)]
    ranked = sorted((t for t in draft_to_target if t not in keep), key=lambda t: (-counts[t], t))
    return sorted(keep + ranked[: size - len(keep)])


def phase_shrink(args) -> None:
    """A draft with a smaller vocabulary, without training: the rows of ``--init-from``'s embedding (and tied
    head) for the ``--vocab`` ids the teacher data uses most, plus its "unknown" row. For every kept id the
    draft's logit is unchanged; dropped ids get q = 0 (the target's token then is a certain rejection), and
    the head, most of a one-token forward at this size, gets cheaper (a larger cost ratio c)."""
    from safetensors.torch import load_file, save_file

    from pearl_ray.modeling.resolve import VOCAB_MAP_FILE

    src, out = Path(args.init_from), Path(args.out)
    if not (src / "model.safetensors").exists():
        raise SystemExit(f"error: --init-from {src} has no model.safetensors")
    vocab = json.loads((src / VOCAB_MAP_FILE).read_text())
    old = vocab["draft_to_target"]
    cfg = json.loads((src / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    eos_ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    new = shrink_ids(old, load_teacher(args), args.vocab, eos_ids)
    row = {t: i for i, t in enumerate(old)}
    rows = torch.tensor([row[t] for t in new] + [len(old)])  # + the "unknown" input row
    weights = load_file(str(src / "model.safetensors"))
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][rows].contiguous()
    if "lm_head.weight" in weights:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():  # tokenizer, configs, model card data
        if f.is_file() and f.name not in ("model.safetensors", VOCAB_MAP_FILE, "config.json"):
            (out / f.name).write_bytes(f.read_bytes())
    cfg["vocab_size"] = len(new) + 1
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / VOCAB_MAP_FILE).write_text(json.dumps({"target_vocab_size": vocab["target_vocab_size"],
                                                  "draft_to_target": new}))
    dist = out / "distill_config.json"
    if dist.exists():
        d = json.loads(dist.read_text())
        d["shrink"] = {"from": str(src), "from_vocab": len(old), "vocab": len(new)}
        dist.write_text(json.dumps(d, indent=2))
    log(f"shrink: wrote {out}: {len(new)} of {len(old)} ids kept")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["gen", "gen-broad", "check-batch", "train", "export", "shrink"], required=True)
    ap.add_argument("--target", default="default-target")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/pearl_ray/distill"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "models" / "default-draft"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--num-questions", type=int, default=1200, help="gen: GSM8K train questions")
    ap.add_argument("--gen-tokens", type=int, default=None, help="gen: 128 (EOS ignored); gen-broad: 192 (at most)")
    ap.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR), help="gen-broad: shard directory")
    ap.add_argument("--families", default="", help="gen-broad: comma-separated subset (default: all)")
    ap.add_argument("--limit", type=int, default=0,
                    help="gen-broad: only the first N prompts of the plan (records from earlier runs count)")
    ap.add_argument("--max-prompt-tokens", type=int, default=900, help="gen-broad: longer prompts are skipped")
    ap.add_argument("--window", type=int, default=4,
                    help="gen-broad: prompts are length-sorted within windows of this many batches")
    ap.add_argument("--check", type=int, default=4, help="check-batch: prompts per family")
    ap.add_argument("--no-chat", dest="chat", action="store_false",
                    help="gen: plain 8-shot prompts only (default alternates plain and chat-template batches)")
    ap.add_argument("--data", choices=["gsm8k", "broad"], default="gsm8k",
                    help="train: the GSM8K teacher set (<work>/teacher.jsonl) or the broad shards (--out-dir)")
    ap.add_argument("--init-from", default="",
                    help="train: warm-start from this draft dir (same layers; its vocabulary is kept and extended)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers", default="0,1,2,29", help="target layers copied into the draft")
    ap.add_argument("--vocab", type=int, default=8192, help="draft vocabulary size (most frequent target ids)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--group-weighting", choices=["equal", "sqrt", "size"], default="equal",
                    help="train --data broad: how often each family's batches come (in turn, or drawn by the square "
                         "root of its size, or by its size)")
    ap.add_argument("--bf16", action="store_true",
                    help="train: CPU autocast to bfloat16 for the matmuls (about 1.8x faster on CPUs with AVX512-BF16)")
    ap.add_argument("--kd-weight", type=float, default=0.0,
                    help="train: weight of the logit-level term (the target's distribution, read online) in the loss")
    ap.add_argument("--kd-prompt", action="store_true",
                    help="train: the logit-level term also covers the prompt tail's positions")
    ap.add_argument("--reload-every", type=int, default=0,
                    help="train --data broad: re-read the teacher shards every N steps (0: never), so records a "
                         "gen-broad run beside it writes join training")
    ap.add_argument("--time-schedule", action="store_true",
                    help="train: the cosine schedule follows the clock as well (ends at --max-minutes, decayed)")
    ap.add_argument("--device", default="cpu",
                    help="gen-broad, train: torch device (cuda: fp32 teacher decoding, bf16 autocast training)")
    ap.add_argument("--val-questions", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--max-minutes", type=float, default=110.0, help="stop (after checkpointing) past this")
    args = ap.parse_args(argv)
    if args.gen_tokens is None:
        args.gen_tokens = 192 if args.phase in ("gen-broad", "check-batch") else 128
    {"gen": phase_gen, "gen-broad": phase_gen_broad, "check-batch": phase_check_batch, "train": phase_train,
     "export": phase_export, "shrink": phase_shrink}[args.phase](args)


if __name__ == "__main__":
    main()
