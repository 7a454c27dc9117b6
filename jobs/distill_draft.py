"""Train the embedded default draft against the default target (sequence-level distillation).

Reproducible: every phase is seeded and writes its config next to its output.

Phases (``--phase``):
  gen    Teacher data. For GSM8K *train* questions (seeded shuffle), build the eval prompt (8-shot CoT, plain
         or chat template, alternating) and record the target's own greedy continuation (``--gen-tokens``,
         EOS ignored, as the fixed-length protocol). Batched decoding over a shared, cached few-shot prefix.
         Appends to ``<work>/teacher.jsonl``; rerunning resumes where it stopped.
  train  Draft: a Llama with the target's width, ``--layers`` layers initialised from evenly spaced target
         layers, and a *reduced vocabulary* (the ``--vocab`` most frequent target tokens of the teacher data
         plus one "unknown" id): its LM head is the matching rows of the target's tied embedding. Loss:
         cross-entropy on the teacher's greedy tokens (the target's argmax at each position, so it trains
         exactly what greedy acceptance measures), over the continuation only, with the few-shot prefix run
         once per step without gradient and shared by the batch. Checkpoints every ``--ckpt-every`` steps
         and resumes from the last checkpoint.
  export Write the final fp16 draft dir (weights, config, ``pearl_vocab.json``, tokenizer, ``distill_config.json``).

Example (the committed draft): see models/README.md for the exact commands and timings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pearl_ray.evals.gsm8k import build_prompt, load_split  # noqa: E402
from pearl_ray.models import VOCAB_MAP_FILE  # noqa: E402


def log(msg: str) -> None:
    print(f"[distill {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_target(target: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pearl_ray.default_pair import resolve_preset

    path = resolve_preset(target) or target
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok, path


def common_prefix_len(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs):
            return i
    return n


@torch.inference_mode()
def batched_greedy(model, prompts: list[list[int]], num_tokens: int, pad_id: int) -> list[list[int]]:
    """Greedy continuations for prompts sharing a prefix: prefix once, suffixes left-padded after it."""
    from transformers import DynamicCache

    b = len(prompts)
    plen = max(1, common_prefix_len(prompts) - 1)  # keep >= 1 suffix token each
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([prompts[0][:plen]]), past_key_values=cache, use_cache=True, logits_to_keep=1)
    cache.batch_repeat_interleave(b)
    suffixes = [p[plen:] for p in prompts]
    width = max(len(s) for s in suffixes)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    smask = torch.zeros((b, width), dtype=torch.long)
    for i, s in enumerate(suffixes):
        ids[i, width - len(s):] = torch.tensor(s)
        smask[i, width - len(s):] = 1
    mask = torch.cat([torch.ones((b, plen), dtype=torch.long), smask], dim=1)
    pos = plen + torch.cumsum(smask, dim=1) - 1
    pos = pos.clamp(min=plen)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    nxt = out.logits[:, -1].argmax(-1)
    last_pos = pos[:, -1]
    gen = [nxt]
    for _ in range(num_tokens - 1):
        mask = torch.cat([mask, torch.ones((b, 1), dtype=torch.long)], dim=1)
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


def pick_vocab(records: list[dict], size: int, eos_ids: list[int], vocab_total: int) -> list[int]:
    """The ``size`` target ids the draft can propose: every id seen in the teacher data (most frequent
    first), then the lowest remaining ids (byte-level BPE numbers its merges roughly by frequency)."""
    counts = Counter()
    for r in records:
        counts.update(r["continuation_ids"])
        counts.update(r["prompt_ids"])
    chosen = [t for t, _ in counts.most_common(size)]
    seen = set(chosen) | set(eos_ids)
    chosen = chosen[: size - len(set(eos_ids) - set(chosen))] + [e for e in eos_ids if e not in chosen]
    seen = set(chosen)
    fill = (t for t in range(vocab_total) if t not in seen)
    while len(chosen) < size:
        chosen.append(next(fill))
    return sorted(chosen)


def batch_loss(draft, batch: list[dict], in_map: torch.Tensor, train_mode: bool) -> tuple[torch.Tensor, float]:
    """Loss and argmax agreement on the continuation tokens of ``batch`` (target ids mapped by ``in_map``)."""
    # Shared few-shot prefix without gradient, then prompt tails + continuations with gradient.
    from transformers import DynamicCache

    unk = int(in_map.max())
    prompts = [r["prompt_ids"] for r in batch]
    plen = common_prefix_len(prompts) - 1
    plen = max(1, min(plen, min(len(p) for p in prompts) - 1))
    seqs = [r["prompt_ids"][plen:] + r["continuation_ids"] for r in batch]
    width = max(len(s) for s in seqs)
    b = len(batch)
    ids = torch.zeros((b, width), dtype=torch.long)
    smask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), -100, dtype=torch.long)
    for i, (r, s) in enumerate(zip(batch, seqs)):
        off = width - len(s)
        ids[i, off:] = in_map[torch.tensor(s)]
        smask[i, off:] = 1
        cont_start = off + len(r["prompt_ids"]) - plen  # index of first continuation token
        tgt = torch.tensor(s[1:] + [-100])  # next-token targets, in target ids
        lab = torch.where(tgt >= 0, in_map[tgt.clamp(min=0)], torch.full_like(tgt, -100))
        lab[lab == unk] = -100  # the draft cannot emit tokens outside its vocabulary
        lab[: cont_start - 1 - off] = -100  # loss on continuation tokens only (and the first one)
        labels[i, off:] = lab
    cache = DynamicCache(config=draft.config)
    with torch.no_grad():
        draft(input_ids=in_map[torch.tensor([prompts[0][:plen]])], past_key_values=cache, use_cache=True,
              logits_to_keep=1)
    cache.batch_repeat_interleave(b)
    mask = torch.cat([torch.ones((b, plen), dtype=torch.long), smask], dim=1)
    pos = (plen + torch.cumsum(smask, dim=1) - 1).clamp(min=plen)
    with torch.set_grad_enabled(train_mode):
        logits = draft(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True).logits[..., :unk]  # the "unknown" id is input-only
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100)
    valid = labels != -100
    acc = float((logits.argmax(-1)[valid] == labels[valid]).float().mean()) if valid.any() else 0.0
    return loss, acc


def phase_train(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    records = [json.loads(line) for line in (work / "teacher.jsonl").read_text().splitlines() if line.strip()]
    # Validation questions are fixed by index (every 25th), so a resumed run with more data keeps them out.
    val = [r for r in records if r["idx"] % 25 == 0][: args.val_questions]
    if not val:  # tiny runs: hold out the first few records instead
        val = records[: max(1, min(args.val_questions, len(records) // 3))]
    val_ids = {r["idx"] for r in val}
    train = [r for r in records if r["idx"] not in val_ids]
    val_plain, val_chat = [r for r in val if not r["chat"]], [r for r in val if r["chat"]]
    train_groups = [g for g in ([r for r in train if not r["chat"]], [r for r in train if r["chat"]]) if g]
    target, tok, tpath = load_target(args.target)
    eos = target.generation_config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    ckpt = work / "ckpt.pt"
    layers = [int(x) for x in args.layers.split(",")]
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        draft_to_target = state["draft_to_target"]
        draft = build_draft(target, layers, draft_to_target)
        draft.load_state_dict(state["model"])
        step = state["step"]
        log(f"train: resumed from step {step}")
    else:
        draft_to_target = pick_vocab(train, args.vocab, eos_ids, len(tok))
        draft = build_draft(target, layers, draft_to_target)
        step, state = 0, None
    del target
    in_map = torch.full((len(tok),), len(draft_to_target), dtype=torch.long)
    in_map[torch.tensor(draft_to_target)] = torch.arange(len(draft_to_target))
    opt = torch.optim.AdamW(draft.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.95))
    if state is not None and "opt" in state:
        opt.load_state_dict(state["opt"])
    cfg_out = vars(args) | {"target_path": tpath, "num_train": len(train), "num_val": len(val),
                            "draft_vocab": len(draft_to_target)}
    (work / "train_config.json").write_text(json.dumps(cfg_out, indent=2))

    def evaluate() -> tuple[float, float]:
        draft.eval()
        losses, accs = [], []
        for group in (val_plain, val_chat):  # one prompt format per batch: the few-shot prefix is shared
            for i in range(0, len(group), args.batch):
                loss, acc = batch_loss(draft, group[i: i + args.batch], in_map, False)
                losses.append(float(loss))
                accs.append(acc)
        draft.train()
        return sum(losses) / len(losses), sum(accs) / len(accs)

    if step == 0:
        vl, va = evaluate()
        log(f"train: step 0 val loss {vl:.3f} val token agreement {va:.3f}")
    draft.train()
    t0, deadline = time.time(), time.time() + args.max_minutes * 60
    # Batches drawn by a generator re-seeded from (seed, step) so a resumed run sees the same data order.
    while step < args.steps and time.time() < deadline:
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        pool = train_groups[step % len(train_groups)]
        batch = random.Random(args.seed * 100_003 + step).sample(pool, min(args.batch, len(pool)))
        loss, acc = batch_loss(draft, batch, in_map, True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.log_every == 0:
            log(f"train: step {step} loss {float(loss):.3f} agree {acc:.3f} lr {lr:.2e} "
                f"{(time.time() - t0) / max(1, step):.2f} s/step (this run)")
        if step % args.ckpt_every == 0 or step == args.steps:
            vl, va = evaluate()
            torch.save({"model": draft.state_dict(), "opt": opt.state_dict(), "step": step,
                        "draft_to_target": draft_to_target, "val_loss": vl, "val_agree": va}, ckpt.with_suffix(".tmp"))
            os.replace(ckpt.with_suffix(".tmp"), ckpt)
            log(f"train: checkpoint at step {step}: val loss {vl:.3f} val token agreement {va:.3f}")
    if step % args.ckpt_every != 0 and step != args.steps:
        vl, va = evaluate()
        torch.save({"model": draft.state_dict(), "opt": opt.state_dict(), "step": step,
                    "draft_to_target": draft_to_target, "val_loss": vl, "val_agree": va}, ckpt)
        log(f"train: stopped at step {step} (time budget): val loss {vl:.3f} val agreement {va:.3f}")


def phase_export(args) -> None:
    work, out = Path(args.work), Path(args.out)
    state = torch.load(work / "ckpt.pt", weights_only=False)
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
    cfg = {"gen": json.loads((work / "gen_config.json").read_text()) if (work / "gen_config.json").exists() else None,
           "train": json.loads((work / "train_config.json").read_text()),
           "final": {"step": state["step"], "val_loss": state["val_loss"], "val_token_agreement": state["val_agree"]}}
    (out / "distill_config.json").write_text(json.dumps(cfg, indent=2))
    log(f"export: wrote {out} (step {state['step']}, val agreement {state['val_agree']:.3f})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase", choices=["gen", "train", "export", "all"], required=True)
    ap.add_argument("--target", default="default-target")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/pearl_ray/distill"))
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "models" / "default-draft"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--num-questions", type=int, default=1200, help="gen: GSM8K train questions")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--no-chat", dest="chat", action="store_false",
                    help="gen: plain 8-shot prompts only (default alternates plain and chat-template batches)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--layers", default="0,1,2,29", help="target layers copied into the draft")
    ap.add_argument("--vocab", type=int, default=8192, help="draft vocabulary size (most frequent target ids)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--val-questions", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--max-minutes", type=float, default=110.0, help="stop (after checkpointing) past this")
    args = ap.parse_args(argv)
    phases = ["gen", "train", "export"] if args.phase == "all" else [args.phase]
    for ph in phases:
        {"gen": phase_gen, "train": phase_train, "export": phase_export}[ph](args)


if __name__ == "__main__":
    main()
