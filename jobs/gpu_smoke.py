"""GPU smoke check of the HF runner on CUDA, for a lent GPU machine (its image has no Ray).

Usage: python3 jobs/gpu_smoke.py <dir holding the target's config.json>
A SmolLM2-shaped target with random weights (the real weights exceed the device tool's transfer limit), the
committed draft, local backend: checks AR == SD == PEARL greedy on CUDA in fp32 and bf16 and times them.
"""
import json, os, sys, time, torch
sys.path.insert(0, os.getcwd())
from transformers import LlamaConfig, LlamaForCausalLM
from pearl_ray import PearlEngine, SamplingParams
from pearl_ray.modeling.hf import load_model, HFCausalLM
print(torch.__version__, torch.cuda.get_device_name(0))
cfg = LlamaConfig.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else ".gpucarry")
torch.manual_seed(0)
res = {}
for dtype in ("float32", "bfloat16"):
    dt = getattr(torch, dtype)
    tgt = LlamaForCausalLM(cfg).to("cuda", dt).eval()
    t = HFCausalLM(tgt)
    d = load_model("models/default-draft", "cuda", dtype, target_vocab_size=t.vocab_size).runner
    eng = PearlEngine(draft_model=d, target_model=t, gamma=4, eos_token_ids=[2])
    prompts = [[1] + list(range(100, 900))]
    p = SamplingParams(max_new_tokens=64, ignore_eos=True)
    outs = {}
    for m in ("ar", "sd", "pearl", "ar", "sd", "pearl"):
        torch.cuda.synchronize(); t0 = time.perf_counter()
        o = eng.generate(prompts, p, method=m)[0]
        torch.cuda.synchronize()
        outs[m] = (o.token_ids, time.perf_counter() - t0, o.stats.acceptance_rate)
    res[dtype] = {m: {"tok_s": round(64 / v[1], 1), "acceptance": round(v[2], 3), "same_as_ar": v[0] == outs["ar"][0]}
                  for m, v in outs.items()}
print(json.dumps(res, indent=2))
