"""What the extra features (residuals at several layers, refusal probability) cost at extraction.

One run, the same encoded batches, the variants interleaved within every round (so load changes
hit all of them alike); per-round ratios, median over rounds:

* `heads`          forward under HeadCapture alone (logits_to_keep=1);
* `heads+extras`   + LayerResidualCapture at the default layers + the refusal-token probability
                   of the first-token logits (the new features; goal <= 1.05 x `heads`);
* `baselines`      heads + ResidualCapture + prompt NLL (the extraction before this change: the
                   perplexity baseline runs the LM head over every position);
* `extraction`     baselines + the new features (what `HeadExtractor.predict_step` computes now).

    python experiments/benchmarks/extra_features.py --target smollm2-135m-instruct --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from lit_sahs.capture import HeadCapture, LayerResidualCapture, ResidualCapture, default_residual_layers
from lit_sahs.data.protocol import build_dataset
from lit_sahs.refusal import refusal_probability, refusal_token_ids
from lit_sahs.targets import load_target, prompting


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tgt = load_target(a.target)
    model, geom = tgt.model, tgt.geometry
    samples = build_dataset(attacks=("plain", "pyrit"), limit=a.samples, seed=0, max_chars=700)
    samples.sort(key=lambda s: len(s.text))
    batches = [prompting.encode(tgt, [s.text for s in samples[i:i + a.batch_size]], [None] * len(samples[i:i + a.batch_size]),
                                [s.id for s in samples[i:i + a.batch_size]]) for i in range(0, len(samples), a.batch_size)]
    layers = default_residual_layers(geom.num_layers)
    ids = refusal_token_ids(tgt.tokenizer)

    def heads(enc):
        with HeadCapture(model, geometry=geom) as cap:
            model(**enc, logits_to_keep=1, use_cache=False)
        cap.activations().to(torch.float16)

    def heads_extras(enc):
        with HeadCapture(model, geometry=geom) as cap, LayerResidualCapture(model, layers) as lres:
            logits = model(**enc, logits_to_keep=1, use_cache=False).logits[:, -1]
        cap.activations().to(torch.float16)
        lres.residuals().to(torch.float16)
        refusal_probability(logits, ids)

    def baselines(enc, extras=False):
        with HeadCapture(model, geometry=geom) as cap, ResidualCapture(model) as res, \
                LayerResidualCapture(model, layers) as lres:
            logits = model(**enc, logits_to_keep=1, use_cache=False).logits[:, -1]
        cap.activations().to(torch.float16)
        res.prompt_nll(enc["input_ids"], enc["attention_mask"])
        if extras:
            lres.residuals().to(torch.float16)
            refusal_probability(logits, ids)

    def baselines_only(enc):
        with HeadCapture(model, geometry=geom) as cap, ResidualCapture(model) as res:
            model(**enc, logits_to_keep=1, use_cache=False)
        cap.activations().to(torch.float16)
        res.prompt_nll(enc["input_ids"], enc["attention_mask"])

    variants = {"heads": heads, "heads+extras": heads_extras, "baselines": baselines_only,
                "extraction": lambda enc: baselines(enc, extras=True)}
    with torch.no_grad():
        for f in variants.values():  # warm-up
            f(batches[0])
        times = {k: [] for k in variants}
        for r in range(a.rounds):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for k in order:
                t0 = time.perf_counter()
                for enc in batches:
                    variants[k](enc)
                times[k].append(time.perf_counter() - t0)
    ratio = lambda x, y: statistics.median(a_ / b_ for a_, b_ in zip(times[x], times[y]))  # noqa: E731
    print(f"target {a.target}, {len(samples)} prompts in batches of {a.batch_size}, {a.threads} thread(s), "
          f"{a.rounds} interleaved rounds; residual layers {list(layers)}, {len(ids)} refusal tokens")
    for k in variants:
        print(f"  {k:14s} median {statistics.median(times[k]):.3f} s / pass")
    print(f"heads+extras / heads      = {ratio('heads+extras', 'heads'):.3f}  (goal <= 1.05)")
    print(f"extraction / baselines    = {ratio('extraction', 'baselines'):.3f}  (new extras over the previous extraction)")
    print(f"extraction / heads        = {ratio('extraction', 'heads'):.3f}  (incl. the perplexity baseline's LM head)")


if __name__ == "__main__":
    main()
