"""What the extra features (residuals at several layers, refusal probability) cost at extraction.

One run, the same encoded batches; on every batch the variants run back to back in a shuffled
order (so a change in machine load hits all of them alike); ratios are paired per batch (median)
and of total time:

* `heads`          forward under HeadCapture alone (logits_to_keep=1);
* `heads+extras`   + LayerResidualCapture at the default layers + the refusal-token probability
                   of the first-token logits (the new features; goal <= 1.05 x `heads`);
* `baselines`      heads + ResidualCapture + prompt NLL (the extraction before this change: the
                   perplexity baseline runs the LM head over every position);
* `extraction`     baselines + the new features (what `HeadExtractor.predict_step` computes now);
* `heads+pool`     heads + every head pooled (mean and max) over the prompt's own tokens
                   (``extract --pool mean,max``), the user-token mask found from the batch's ids;
* `heads+tokens`   heads + 32 heads at each of the prompt's last 64 own tokens (``extract
                   --token_top_k 32 --token_length 64``: what the attention-pooling family reads);
* `extraction+judge` extraction + the judge prefill (``extract --judge``, ``lit_sahs.self_judge``): the
                   judging turn encoded and run through the target, a second forward.

    python experiments/benchmarks/extra_features.py --target smollm2-135m-instruct --threads 1
"""
from __future__ import annotations

import statistics
import time
from types import SimpleNamespace

import torch

from lit_sahs.commands import script_main
from lit_sahs.data.extra_features import default_residual_layers
from lit_sahs.heads import HeadSet
from lit_sahs.hooks import HeadCapture, LayerResidualCapture, ResidualCapture
from lit_sahs.prompt_hooks import PooledHeadCapture, TokenHeadCapture
from lit_sahs.data.protocol import build_dataset
from lit_sahs.refusal import refusal_probability, refusal_token_ids
from lit_sahs.self_judge import judge_logodds, judge_token_ids
from lit_sahs.targets import load_target, prompting


def run(target: str = "smollm2-135m-instruct", threads: int = 1, samples: int = 48, batch_size: int = 8,
        rounds: int = 5, token_heads: int = 32, token_length: int = 64) -> None:
    """What the extra features (layer residuals, refusal probability) add to a capture forward.

    Args:
        target: packaged target name
        threads: torch CPU threads
        samples: prompts (plain and pyrit, <= 700 characters)
        batch_size: prompts per batch
        rounds: interleaved rounds over all batches
        token_heads: heads recorded at every token (`heads+tokens`: the first ones of layer order)
        token_length: prompt tokens recorded per head
    """
    a = SimpleNamespace(**locals())
    torch.set_num_threads(a.threads)
    tgt = load_target(a.target)
    model, geom = tgt.model, tgt.geometry
    samples = build_dataset(attacks=("plain", "pyrit"), limit=a.samples, seed=0, max_chars=700)
    samples.sort(key=lambda s: len(s.text))
    texts = [[s.text for s in samples[i:i + a.batch_size]] for i in range(0, len(samples), a.batch_size)]
    batches = [prompting.encode(tgt, t, [None] * len(t), [str(j) for j in range(len(t))]) for t in texts]
    texts_of = {id(enc): t for enc, t in zip(batches, texts)}
    encoder = prompting.Encoder.of(tgt)
    some_heads = HeadSet(list(HeadSet.all(geom))[:: max(1, geom.num_layers * geom.num_heads // a.token_heads)]
                         [: a.token_heads])
    layers = default_residual_layers(geom.num_layers)
    ids = refusal_token_ids(tgt.tokenizer)
    judge_ids = judge_token_ids(tgt.tokenizer)

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

    def heads_pool(enc):
        mask = encoder.mask_of(enc)
        with HeadCapture(model, geometry=geom) as cap, PooledHeadCapture(model, mask, ("mean", "max"), geom) as pool:
            model(**enc, logits_to_keep=1, use_cache=False)
        cap.activations().to(torch.float16)
        {k: v.to(torch.float16) for k, v in pool.pooled().items()}

    def heads_tokens(enc):
        mask = encoder.mask_of(enc)
        with HeadCapture(model, geometry=geom) as cap, \
                TokenHeadCapture(model, some_heads, a.token_length, mask, geom) as tok:
            model(**enc, logits_to_keep=1, use_cache=False)
        cap.activations().to(torch.float16)
        tok.tokens()[0].to(torch.float16)

    def extraction_judge(enc):
        baselines(enc, extras=True)
        judge_logodds(tgt, texts_of[id(enc)], judge_ids)

    variants = {"heads": heads, "heads+extras": heads_extras, "baselines": baselines_only,
                "extraction": lambda enc: baselines(enc, extras=True), "heads+pool": heads_pool,
                "heads+tokens": heads_tokens, "extraction+judge": extraction_judge}
    import random

    rng = random.Random(0)
    with torch.no_grad():
        for f in variants.values():  # warm-up
            f(batches[0])
        # interleaved per batch: every variant runs on the same batch back to back, in a shuffled
        # order, so a change in machine load hits all of them alike; ratios are paired per batch
        times = {k: [] for k in variants}
        for _ in range(a.rounds):
            for enc in batches:
                order = list(variants)
                rng.shuffle(order)
                for k in order:
                    t0 = time.perf_counter()
                    variants[k](enc)
                    times[k].append(time.perf_counter() - t0)
    ratio = lambda x, y: statistics.median(a_ / b_ for a_, b_ in zip(times[x], times[y]))  # noqa: E731
    total = lambda x, y: sum(times[x]) / sum(times[y])  # noqa: E731
    print(f"target {a.target}, {len(samples)} prompts in batches of {a.batch_size}, {a.threads} thread(s), "
          f"{a.rounds} interleaved rounds; residual layers {list(layers)}, {len(ids)} refusal tokens")
    for k in variants:
        print(f"  {k:14s} {sum(times[k]):.2f} s in all, median {statistics.median(times[k]):.3f} s / batch")
    print("ratio (median of per-batch paired ratios; total time ratio):")
    for x, y, note in (("heads+extras", "heads", "goal <= 1.05"),
                      ("extraction", "baselines", "the new extras over the previous extraction"),
                      ("extraction", "heads", "incl. the perplexity baseline's LM head over every position"),
                      ("heads+pool", "heads", "mean and max pooling of every head over the prompt"),
                      ("heads+tokens", "heads", f"{len(some_heads)} heads at the last {a.token_length} tokens"),
                      ("extraction+judge", "extraction", "the judge prefill (extract --judge)")):
        print(f"  {x} / {y} = {ratio(x, y):.3f}; {total(x, y):.3f}  ({note})")
    per_pool = geom.num_layers * geom.num_heads * geom.head_dim * 2
    per_tokens = len(some_heads) * a.token_length * (geom.head_dim * 2) + a.token_length + len(some_heads) * 4
    print(f"store bytes per prompt: first-token heads {per_pool}, each pooling {per_pool} more, "
          f"{len(some_heads)} heads x {a.token_length} tokens {per_tokens} more (float16), the judge 4 (float32)")
    n = sum(len(t) for t in texts) * a.rounds
    print(f"per prompt: extraction {1e3 * sum(times['extraction']) / n:.1f} ms, "
          f"the judge prefill {1e3 * (sum(times['extraction+judge']) - sum(times['extraction'])) / n:.1f} ms more")


if __name__ == "__main__":
    raise SystemExit(script_main(run))
