"""Vision-language extraction speed: a LLaVA-1.5-7B-shaped target (the real LLaVA architecture,
random weights, bf16) on visual-attack prompts of about 640 tokens (576 image tokens + text).

Measured in one run, on the same pre-encoded batches:

* bare forward vs forward under HeadCapture (every head of every layer at the first-token
  position), alternating bare/captured per repeat so drift hits both; samples/s and the ratio
  of medians, per batch size;
* model FLOP utilisation: 2 x parameters x tokens plus causal attention (2 x layers x hidden x T^2)
  for the language model, the same (bidirectional, 4 x ...) for the CLIP tower and the projector,
  divided by the time and by the device's dense bf16 peak (989 TFLOP/s for H100/H200 SXM, or
  --peak_tflops);
* the whole extraction loop (`run_extraction`: processor on the CPU, forward with head and
  residual capture, prompt NLL, store writes) in samples/s, and the processor's share.

GPU (the figures this script exists for):

    python experiments/benchmarks/lvlm_extract.py --batch_sizes 16,32

CPU smoke run with a small config of the same architecture (4 layers x 8 heads x 32, a 2-layer
CLIP tower at 336 px / patch 14, so prompts keep their ~640 tokens):

    python experiments/benchmarks/lvlm_extract.py --small --device cpu --batch_sizes 16 --repeats 3
"""
from __future__ import annotations

import json
import tempfile
import time
from types import SimpleNamespace
from typing import Optional

import torch

from lit_sahs.capture_timing import alternate_bare_and_capture, sync
from lit_sahs.commands import script_main
from lit_sahs.data.protocol import build_dataset
from lit_sahs.targets import prompting
from lit_sahs.targets.tiny import LLAVA_15_7B_TEXT, LLAVA_15_7B_VISION, random_llava_target

SMALL_TEXT = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5)
SMALL_VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=128)
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0}


def batch_flops(config, batch: dict) -> float:
    """Model FLOPs of one forward over `batch` (see the module docstring)."""
    t, v = config.text_config, config.vision_config
    h, i, L = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    kv = t.num_key_value_heads * (h // t.num_attention_heads)
    text_params = L * (2 * h * h + 2 * h * kv + 3 * h * i)
    lengths = batch["attention_mask"].sum(1).double()
    text = float((2 * text_params * lengths + 2 * L * h * lengths ** 2).sum())
    n_images = int(batch["pixel_values"].shape[0]) if "pixel_values" in batch else 0
    patches = (v.image_size // v.patch_size) ** 2 + 1
    vh, vi, vl = v.hidden_size, v.intermediate_size, v.num_hidden_layers
    vision_params = vl * (4 * vh * vh + 2 * vh * vi)
    vision = n_images * (2 * vision_params * patches + 4 * vl * vh * patches ** 2)
    projector = n_images * (patches - 1) * 2 * (vh * h + h * h)
    return text + vision + projector


def device_peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p for k, p in PEAK_BF16_TFLOPS.items() if k in name), None)


def run(device: str = "auto", small: bool = False, dtype: Optional[str] = None, batch_sizes: str = "16,32",
        batches: int = 4, repeats: int = 5, attacks: str = "figstep,mmsb,unrelated_image", loop_samples: int = 128,
        loop_workers: str = "0,4", loop_batch_size: Optional[int] = None, tokenizer: Optional[str] = None,
        peak_tflops: Optional[float] = None) -> None:
    """Capture overhead, model FLOP utilisation and extraction-loop throughput of a LLaVA-1.5-7B-shaped target.

    Args:
        device: cuda, cpu, or auto (cuda when there is one)
        small: small config of the same architecture (CPU smoke run)
        dtype: bfloat16 (default on CUDA) or float32 (default on CPU)
        batch_sizes: comma-separated batch sizes of the capture timing
        batches: batches per timed pass
        repeats: alternating bare/captured repeats (0: skip the capture timing)
        attacks: comma-separated visual attacks making the prompts
        loop_samples: samples through the full extraction loop (0: skip)
        loop_workers: DataLoader encoding processes for the loop, one loop run per value
        loop_batch_size: batch size of the loop (default: the largest --batch_sizes)
        tokenizer: saved tokenizer directory (default: the packaged SmolLM2 tokenizer)
        peak_tflops: dense bf16 peak of the device, for utilisation
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    args = SimpleNamespace(**locals())

    device = torch.device(args.device)
    dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
             "float16": torch.float16, None: torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]
    shape = "small" if args.small else "llava-1.5-7b"
    t0 = time.perf_counter()
    target = random_llava_target(f"random-{shape}", SMALL_TEXT if args.small else LLAVA_15_7B_TEXT,
                                 SMALL_VISION if args.small else LLAVA_15_7B_VISION, dtype=dtype, device=device,
                                 tokenizer=args.tokenizer)
    build_s = time.perf_counter() - t0
    model, config = target.model, target.model.config
    n_params = sum(p.numel() for p in model.parameters())
    sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()] if args.repeats > 0 else []
    loop_bs = args.loop_batch_size or max(sizes or [32])
    attacks = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    n = max(sizes or [0]) * args.batches or args.loop_samples
    samples = build_dataset(harmful=("advbench", "harmbench"), benign=("truthfulqa", "healthsearchqa"),
                            attacks=attacks, limit=max(n, 2 * len(attacks)), seed=0)
    samples = (samples * (n // len(samples) + 1))[:n]
    peak = device_peak_tflops(device, args.peak_tflops)
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"target {shape}: {n_params / 1e9:.2f}B parameters, {target.geometry.num_layers} layers x "
          f"{target.geometry.num_heads} heads x {target.geometry.head_dim}, {dtype}, built in {build_s:.1f}s on {dev_name}")
    print(f"torch {torch.__version__}; attacks {','.join(attacks)}; {args.repeats} alternating repeats of "
          f"{args.batches} batches per batch size")
    results = []
    for bs in sizes:
        t = time.perf_counter()
        chunks = [samples[i:i + bs] for i in range(0, bs * args.batches, bs)]
        batches = [prompting.encode(target, [s.text for s in c], [s.image for s in c], [s.id for s in c]) for c in chunks]
        encode_s = time.perf_counter() - t
        batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        padded = sum(b["input_ids"].numel() for b in batches)
        flops = sum(batch_flops(config, b) for b in batches)
        t = alternate_bare_and_capture(model, batches, args.repeats, device)
        mb, mc, ratios = t["bare"], t["captured"], t["ratios"]
        m = len(chunks) * bs
        row = {"batch_size": bs, "samples": m, "mean_tokens": tokens / m, "padded_tokens": padded / m,
               "bare_samples_s": m / mb, "capture_samples_s": m / mc, "capture_over_bare": mc / mb,
               "ratio_min": ratios[0], "ratio_max": ratios[-1], "tflops_bare": flops / mb / 1e12,
               "encode_ms_per_sample": 1000 * encode_s / m}
        if peak:
            row["mfu_bare"] = row["tflops_bare"] / peak
        results.append(row)
        print(f"batch {bs}: {m} samples, {row['mean_tokens']:.0f} tokens/sample ({row['padded_tokens']:.0f} padded); "
              f"bare {row['bare_samples_s']:.2f} samples/s, under HeadCapture {row['capture_samples_s']:.2f} samples/s, "
              f"capture/bare {row['capture_over_bare']:.4f} (per-repeat {ratios[0]:.4f}..{ratios[-1]:.4f}); "
              f"{row['tflops_bare']:.3g} TFLOP/s" + (f" = {100 * row['mfu_bare']:.0f}% of {peak:.0f} peak" if peak else "")
              + f"; processor {row['encode_ms_per_sample']:.1f} ms/sample on the CPU")
        del batches
        if device.type == "cuda":
            torch.cuda.empty_cache()
    loops = []
    if args.loop_samples:
        from lit_sahs.extract import run_extraction

        k = args.loop_samples
        for workers in [int(w) for w in args.loop_workers.split(",")]:
            loop_samples = (samples * (k // len(samples) + 1))[:k]
            # unique ids so every sample is extracted (repeats of a sample would be skipped)
            loop_samples = [s.with_(id=f"{s.id}-w{workers}-{i}") for i, s in enumerate(loop_samples)]
            with tempfile.TemporaryDirectory() as d:
                sync(device)
                t = time.perf_counter()
                run_extraction(target, loop_samples, f"{d}/store", batch_size=loop_bs, block_rows=256,
                               num_workers=workers,
                               trainer_kwargs={"accelerator": "gpu" if device.type == "cuda" else "cpu",
                                               "devices": 1, "enable_progress_bar": False})
                sync(device)
                loop_s = time.perf_counter() - t
            loops.append({"samples": k, "batch_size": loop_bs, "workers": workers, "samples_s": k / loop_s})
            print(f"extraction loop (processor + forward with head and residual capture + NLL + store writes), "
                  f"{k} samples at batch {loop_bs}, {workers} encoding workers: {k / loop_s:.2f} samples/s end to end",
                  flush=True)
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")
    print(json.dumps({"shape": shape, "device": dev_name, "dtype": str(dtype), "params": n_params,
                      "results": results, "loop": loops}))


if __name__ == "__main__":
    raise SystemExit(script_main(run))
