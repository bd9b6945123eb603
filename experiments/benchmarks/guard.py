"""What guarding costs: plain vs guarded generate, time to first token, screening vs a full forward,
and an external guard (a second model's forward over the same prompt) for comparison.

Everything is measured in one run, on the same prompts, alternating the two sides of each
comparison (plain first in even pairs, guarded first in odd ones) and reporting the *median of the
per-pair ratios*: on a shared machine plain generate against itself varies by more than the guard
costs, and alternating pairs cancel slow drift.

* generate: ``--new_tokens`` (128) new tokens, greedy, ``min_new_tokens`` = ``max_new_tokens`` so both
  sides decode exactly as many steps; the guard runs with threshold 2.0 (it scores every prompt but
  flags none) so both sides do the same decoding work. The outputs are compared row by row with a
  plain run, next to plain against itself (bf16 kernels on a GPU need not repeat bit for bit, and
  with near-tied logits a greedy path can then fork), and the first step's raw logits of plain and
  guarded are compared (max absolute difference).
  Goal: ratio <= 1.03 on a CPU, <= 1.01 on a GPU.
* time to first token: the same with ``max_new_tokens=1`` (the guard's scoring is inside it).
* screening: ``lit_sahs.screen.head_activations`` (early exit after the detector's deepest layer)
  vs a full forward with the same capture (``logits_to_keep=1``, as extraction runs it). Goal
  >= 1.35x when the deepest selected layer is at two thirds of the depth.
* external guard: a second copy of a target-sized model runs one forward over each prompt before
  generation (a guard model that reads the prompt); reported as (plain + external) / plain.

The detector is built on the fly (logistic, random weights, ``--k`` heads spread over the first
``--depth`` of the layers: the cost does not depend on the weights), or given with ``--detector``.

    python experiments/benchmarks/guard.py                                  # SmolLM2 on the CPU
    python experiments/benchmarks/guard.py --batch_sizes 1,8 --pairs 10 --out experiments/results/guard_benchmark.md
    python experiments/benchmarks/guard.py --target random-llava-1.5-7b --device cuda --dtype bfloat16

`random-llava-1.5-7b` is the LLaVA-1.5-7B architecture with random weights, built on the device
(no download); `--tokenizer DIR` gives it a saved tokenizer where the packaged SmolLM2 one is absent.
"""
from __future__ import annotations

import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from types import SimpleNamespace
from typing import Optional

import torch

from lit_sahs.commands import script_main


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def prefill_logit_diff(model, enc: dict, heads, geometry) -> tuple[float, float]:
    """Max |difference| of the prefill's last-position logits: bare vs bare, bare vs under the
    guard's HeadCapture (the only thing the guard adds to the prefill)."""
    from lit_sahs.hooks import HeadCapture

    with torch.no_grad():
        a = model(**enc, logits_to_keep=1).logits.float()
        b = model(**enc, logits_to_keep=1).logits.float()
        with HeadCapture(model, heads, geometry):
            c = model(**enc, logits_to_keep=1).logits.float()
    return float((a - b).abs().max()), float((a - c).abs().max())


def pairs_ratio(run_a, run_b, pairs: int, device) -> dict:
    """Alternate a and b `pairs` times; median of b/a per pair, medians of each side."""
    ta, tb, ratios = [], [], []
    for i in range(pairs):
        if i % 2 == 0:
            a, _ = timed(run_a, device)
            b, _ = timed(run_b, device)
        else:
            b, _ = timed(run_b, device)
            a, _ = timed(run_a, device)
        ta.append(a)
        tb.append(b)
        ratios.append(b / a)
    return {"a": statistics.median(ta), "b": statistics.median(tb), "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios)}


def run(target: str = "smollm2-135m-instruct", detector: Optional[str] = None, k: int = 8, depth: float = 2 / 3,
        external: Optional[str] = None, device: str = "auto", dtype: Optional[str] = None, batch_sizes: str = "1,8",
        new_tokens: int = 128, pairs: int = 10, screen_batch: int = 8, threads: Optional[int] = None,
        tokenizer: Optional[str] = None, out: Optional[str] = None) -> int:
    """Guarded against plain generate, time to first token, screening and an external guard, one run.

    Args:
        target: packaged target name (random-llava-1.5-7b: the LLaVA-1.5-7B architecture, random weights)
        detector: a detector artifact (default: random weights on --k heads)
        k: heads of the random detector
        depth: deepest selected layer, as a share of the layers
        external: external guard model (default: a second copy of --target)
        device: cuda, cpu, or auto (cuda when there is one)
        dtype: default: bfloat16 on CUDA, float32 on the CPU
        batch_sizes: comma-separated batch sizes of the generate comparison
        new_tokens: tokens generated per prompt
        pairs: alternating plain/guarded pairs per measurement (>= 10)
        screen_batch: prompts per screening batch
        threads: torch CPU threads (default: torch's)
        tokenizer: saved tokenizer directory for --target random-llava-1.5-7b (default: SmolLM2's)
        out: also write the results as markdown here
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    args = SimpleNamespace(**locals())
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")

    from lit_sahs.data.sources import load_source
    from lit_sahs.detectors.placeholder import random_detector
    from lit_sahs.guard import SafetyGuard
    from lit_sahs.prompts import encode_prompts
    from lit_sahs.screen import head_activations
    from lit_sahs.hooks import HeadCapture
    from lit_sahs.targets import load_target as load
    from lit_sahs.targets.registry import RANDOM_LLAVA_7B, parse_dtype
    from lit_sahs.targets.tiny import LLAVA_15_7B_TEXT, LLAVA_15_7B_VISION, random_llava_target

    def load_target(name, dtype, device):
        if name == RANDOM_LLAVA_7B and args.tokenizer:
            return random_llava_target(name, LLAVA_15_7B_TEXT, LLAVA_15_7B_VISION, dtype=parse_dtype(dtype),
                                       device=device, tokenizer=args.tokenizer)
        return load(name, dtype=dtype, device=device)

    target = load_target(args.target, dtype=dtype, device=args.device)
    det = random_detector(target, args.k, args.depth) if args.detector is None else None
    guard = SafetyGuard(target, det if det is not None else args.detector, threshold=2.0)  # scores, never flags
    heads = guard.head_set
    external = load_target(args.external or args.target, dtype=dtype, device=args.device)
    prompts = [s.text for s in load_source("truthfulqa", limit=64, seed=0)]
    model, pad = target.model, target.tokenizer.pad_token_id
    g = target.geometry
    layers_run = max(heads.layers) + 1
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    header = (f"target {args.target} ({g.num_layers} layers x {g.num_heads} heads, {dtype}) on {device_name}; "
              f"detector: {len(heads)} heads, deepest layer {max(heads.layers)} ({layers_run}/{g.num_layers} layers); "
              f"{args.pairs} alternating pairs, median of per-pair ratios")
    print(header, flush=True)
    rows = []

    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        texts = prompts[:bs]
        enc = {k: v.to(args.device) for k, v in encode_prompts(target, texts, reserve=args.new_tokens,
                                                                for_generate=True).items()}
        ext_enc = {k: v.to(args.device) for k, v in encode_prompts(external, texts).items()}
        kw = dict(do_sample=False, pad_token_id=pad)

        def plain(n):
            with torch.no_grad():
                return model.generate(**enc, max_new_tokens=n, min_new_tokens=n, **kw)[:, enc["input_ids"].shape[1]:]

        def guarded(n):
            return guard.generate_tokens(dict(enc), max_new_tokens=n, min_new_tokens=n, **kw)[0]

        def external_forward():
            with torch.no_grad():
                external.model(**ext_enc, use_cache=False, logits_to_keep=1)

        # warm-up, then the equality checks: the guard must not change unflagged outputs
        plain(args.new_tokens), guarded(args.new_tokens)
        ref = plain(args.new_tokens)
        same_plain = int((plain(args.new_tokens) == ref).all(1).sum())
        same = int((guarded(args.new_tokens) == ref).all(1).sum())
        logit_diff = prefill_logit_diff(model, enc, heads, g)
        gen = pairs_ratio(lambda: plain(args.new_tokens), lambda: guarded(args.new_tokens), args.pairs, args.device)
        ttft = pairs_ratio(lambda: plain(1), lambda: guarded(1), args.pairs, args.device)
        ext = [timed(external_forward, args.device)[0] for _ in range(max(3, args.pairs // 2))]
        t_ext = statistics.median(ext)
        rows.append({"batch": bs, "plain_s": gen["a"], "guarded_s": gen["b"], "ratio": gen["ratio"],
                     "ratio_range": (gen["ratio_min"], gen["ratio_max"]), "same_tokens": same,
                     "same_plain": same_plain, "logit_diff": logit_diff,
                     "ttft_plain_s": ttft["a"], "ttft_guarded_s": ttft["b"], "ttft_ratio": ttft["ratio"],
                     "external_s": t_ext, "external_ratio": (gen["a"] + t_ext) / gen["a"],
                     "external_ttft_ratio": (ttft["a"] + t_ext) / ttft["a"]})
        r = rows[-1]
        print(f"batch {bs}: generate {args.new_tokens} tokens plain {r['plain_s']:.3f} s, guarded {r['guarded_s']:.3f} s, "
              f"ratio {r['ratio']:.4f} (pairs {r['ratio_range'][0]:.3f}-{r['ratio_range'][1]:.3f}), rows equal to plain: guarded {same}/{bs}, plain again {same_plain}/{bs}; "
              f"prefill logits max |diff| plain/plain {logit_diff[0]:.3g}, plain/captured {logit_diff[1]:.3g}; "
              f"TTFT plain {r['ttft_plain_s'] * 1e3:.1f} ms, guarded {r['ttft_guarded_s'] * 1e3:.1f} ms "
              f"(ratio {r['ttft_ratio']:.4f}); external guard forward {t_ext * 1e3:.1f} ms -> "
              f"generate x{r['external_ratio']:.3f}, TTFT x{r['external_ttft_ratio']:.3f}", flush=True)

    # screening throughput: early exit vs a full forward, same capture, same batches
    batches = [{k: v.to(args.device) for k, v in encode_prompts(target, prompts[i:i + args.screen_batch]).items()}
               for i in range(0, len(prompts), args.screen_batch)]

    def screen_all():
        for b in batches:
            head_activations(target, b, heads, early_exit=True)

    def full_all():
        with torch.no_grad():
            for b in batches:
                with HeadCapture(model, heads, g) as cap:
                    model(**b, use_cache=False, logits_to_keep=1)
                cap.selected()

    screen_all(), full_all()  # warm-up
    scr = pairs_ratio(full_all, screen_all, args.pairs, args.device)
    speedup = 1 / scr["ratio"]
    print(f"screening {len(prompts)} prompts in batches of {args.screen_batch}: full forward "
          f"{len(prompts) / scr['a']:.1f} prompts/s, early exit after layer {max(heads.layers)} "
          f"{len(prompts) / scr['b']:.1f} prompts/s -> {speedup:.3f}x (ideal {g.num_layers / layers_run:.3f}x)", flush=True)

    if args.out:
        from lit_sahs.io import atomic_write_text

        cmd = "python experiments/benchmarks/guard.py " + " ".join(sys.argv[1:])
        lines = [f"Measured {datetime.now(timezone.utc):%Y-%m-%d} with `{cmd.strip()}`: {header}.", "",
                 "| batch | plain generate (s) | guarded (s) | guarded / plain | pair range | rows = plain: guarded, plain again | "
                 "prefill logits max abs diff: plain/plain, plain/captured | "
                 "TTFT plain (ms) | TTFT guarded (ms) | TTFT ratio | external guard forward (ms) | "
                 "plain + external / plain | TTFT with external / plain |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['batch']} | {r['plain_s']:.3f} | {r['guarded_s']:.3f} | {r['ratio']:.4f} | "
                         f"{r['ratio_range'][0]:.3f}–{r['ratio_range'][1]:.3f} | {r['same_tokens']}/{r['batch']}, {r['same_plain']}/{r['batch']} | "
                         f"{r['logit_diff'][0]:.3g}, {r['logit_diff'][1]:.3g} | "
                         f"{r['ttft_plain_s'] * 1e3:.1f} | {r['ttft_guarded_s'] * 1e3:.1f} | {r['ttft_ratio']:.4f} | "
                         f"{r['external_s'] * 1e3:.1f} | {r['external_ratio']:.3f} | {r['external_ttft_ratio']:.3f} |")
        lines += ["", f"Screening {len(prompts)} prompts (batches of {args.screen_batch}): full forward "
                      f"{len(prompts) / scr['a']:.1f} prompts/s, early exit after layer {max(heads.layers)} "
                      f"({layers_run}/{g.num_layers} layers) {len(prompts) / scr['b']:.1f} prompts/s: "
                      f"**{speedup:.3f}x** (pairs {1 / scr['ratio_max']:.3f}–{1 / scr['ratio_min']:.3f}; "
                      f"layer-count ideal {g.num_layers / layers_run:.3f}x).", ""]
        atomic_write_text(args.out, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(script_main(run))
