"""Put a pair's weights on every node of a running Ray cluster, where pair presets look for them.

Presets never download (``pearl_ray/modeling/presets.py``): they find each model in ``$PEARL_RAY_MODEL_DIR``
or in the Hugging Face cache (``$HF_HOME/hub``) of the process that resolves them. On a Ray cluster that is
the job's driver on the head (it also reads the configs and tokenizers) and the model actors on the GPU
nodes, so every node needs the models under the same path. This job downloads them there:

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json "{\\"env_vars\\": {\\"HF_TOKEN\\": \\"$HF_TOKEN\\"}}" -- \\
        python clusters/fetch_models.py --preset llama-3.1-8b-70b

- GPU nodes get the full weights (safetensors; the ``original/`` checkpoints are skipped), the other nodes
  (the head) only the JSON files (configs, tokenizer). Each model is pinned to one revision, resolved once
  here, so the cache's ``snapshots/<revision>`` folder is the same path on every node.
- ``--shared``: ``HF_HOME`` is one filesystem shared by all nodes (EFS, Filestore, NFS): download the full
  weights once, on one node.
- ``--local``: no Ray; download the full weights into this process's ``HF_HOME`` (e.g. a Kubernetes Job
  filling a shared volume: clusters/kuberay/fetch-models.yaml).
- Nodes that join later have nothing: run it again (finished files are not fetched twice).
- ``HF_TOKEN`` (gated Llama weights) comes from the job's runtime environment; every download task runs with
  ``HF_HUB_OFFLINE=0`` whatever the nodes set.

Exit codes: 0 every node has every model; 1 a download failed; 2 bad options or no cluster node alive.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIG_PATTERNS = ["*.json"]
"""What a node without GPUs gets: config.json, generation_config.json, tokenizer.json, tokenizer_config.json."""
IGNORE_PATTERNS = ["original/*"]
"""Never fetched: the consolidated checkpoints some repos (Llama) ship beside the safetensors files."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fetch_models.py", description="Download a pair's weights onto every node "
                                 "of the Ray cluster this job runs on (the Hugging Face cache at $HF_HOME/hub).")
    ap.add_argument("--preset", action="append", default=[], help="a pair preset, e.g. llama-3.1-8b-70b (repeatable)")
    ap.add_argument("--model", action="append", default=[], help="a hub id to fetch as well (repeatable)")
    ap.add_argument("--shared", action="store_true",
                    help="HF_HOME is one filesystem shared by all nodes: download once")
    ap.add_argument("--local", action="store_true", help="no Ray: download the full weights here")
    ap.add_argument("--dry-run", action="store_true", help="print the plan; contact neither the hub nor download")
    ap.add_argument("--ray-address", default=None, help="Ray to join (default: the job's cluster or $RAY_ADDRESS)")
    return ap


def model_ids(presets: list[str], models: list[str]) -> list[str]:
    """The hub ids of the presets' pairs and of ``models``, in order, without repeats."""
    ids = []
    if presets:
        from pearl_ray.modeling.presets import get_preset

        ids = [mid for name in presets for mid in get_preset(name).model_ids]
    return list(dict.fromkeys(ids + list(models)))


def plan(nodes: list[dict], shared: bool) -> list[tuple[str, bool]]:
    """``(node_id, full)`` per download: every alive node (full weights where it has GPUs, configs and
    tokenizers elsewhere), or with ``shared`` one node (a GPU node if any) with the full weights."""
    alive = [n for n in nodes if n.get("Alive")]
    has_gpu = [n for n in alive if n.get("Resources", {}).get("GPU", 0) > 0]
    if shared:
        chosen = (has_gpu or alive)[:1]
        return [(n["NodeID"], True) for n in chosen]
    return [(n["NodeID"], n.get("Resources", {}).get("GPU", 0) > 0) for n in alive]


def fetch(model_id: str, revision: str | None, full: bool) -> dict:
    """Download one model at one revision into this node's hub cache (run as a Ray task on that node)."""
    from huggingface_hub import snapshot_download

    start = time.monotonic()
    path = snapshot_download(model_id, revision=revision, allow_patterns=None if full else CONFIG_PATTERNS,
                             ignore_patterns=IGNORE_PATTERNS)
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return {"node": socket.gethostname(), "model": model_id, "full": full, "path": path,
            "gib": round(size / 2**30, 1), "seconds": round(time.monotonic() - start)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        ids = model_ids(args.preset, args.model)
    except Exception as exc:  # noqa: BLE001 - an unknown preset: InvalidParameterError names the known ones
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not ids:
        print("error: name at least one --preset or --model", file=sys.stderr)
        return 2
    os.environ["HF_HUB_OFFLINE"] = "0"  # before huggingface_hub is imported: this job is the one that downloads
    if args.local:
        print(f"here: full weights of {', '.join(ids)}")
        if args.dry_run:
            return 0
        for mid in ids:
            r = fetch(mid, None, True)
            print(f"{r['node']}: {r['model']} -> {r['path']} ({r['gib']} GiB, {r['seconds']} s)")
        return 0
    import ray
    from huggingface_hub import HfApi
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address=args.ray_address or os.environ.get("RAY_ADDRESS") or "auto")
    steps = plan(ray.nodes(), args.shared)
    if not steps:
        print("error: no alive node in the cluster", file=sys.stderr)
        return 2
    for node_id, full in steps:
        print(f"node {node_id[:12]}: {'full weights' if full else 'configs and tokenizers'} of {', '.join(ids)}")
    if args.dry_run:
        return 0
    revisions = {mid: HfApi().model_info(mid).sha for mid in ids}  # one revision for every node
    task = ray.remote(fetch)
    pending = {task.options(num_cpus=0, max_retries=2, runtime_env={"env_vars": {"HF_HUB_OFFLINE": "0"}},
                            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)
                            ).remote(mid, revisions[mid], full): (node_id, mid)
               for node_id, full in steps for mid in ids}
    failed = 0
    for ref, (node_id, mid) in pending.items():
        try:
            r = ray.get(ref)
            print(f"{r['node']}: {r['model']} -> {r['path']} ({r['gib']} GiB, {r['seconds']} s)")
        except Exception as exc:  # noqa: BLE001 - report every node, then fail
            failed += 1
            print(f"node {node_id[:12]}: {mid} failed: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
