"""Does SafeVLM's safety head learn? SmolLM2-135M, AdvBench/HarmBench/Do-Not-Answer vs TruthfulQA/MMLU,
plain prompts <= 300 chars, 160 rows, a *random* split (nothing held out: an in-distribution check,
not a generalisation figure); stage-I losses (LM + 10 x classifier) by hand, test AUROC per epoch.

    python experiments/safevlm_head_check.py
"""
from __future__ import annotations

from lit_sahs.commands import script_main


def run(target: str = "smollm2-135m-instruct", epochs: int = 3, limit: int = 160, num_safety_tokens: int = 8,
        feature_layer: int = 15, lr: float = 3e-3, threads: int = 2) -> int:
    """Stage-I SafeVLM trained step by step; prints epoch, classifier loss, LM loss, test AUROC, seconds.

    Args:
        target: packaged target name
        epochs: passes over the train split
        limit: prompts drawn in all (harmful and benign)
        num_safety_tokens: safety tokens per set
        feature_layer: the layer whose hidden states feed the safety head
        lr: stage-I learning rate
        threads: torch CPU threads
    """
    import time

    import torch
    from sklearn.metrics import roc_auc_score

    from lit_sahs.safevlm import SafeVLM, SafetyDataModule
    from lit_sahs.targets import load_target

    torch.set_num_threads(threads)
    t = load_target(target)
    dm = SafetyDataModule(target=t, harmful="advbench,harmbench,donotanswer", benign="truthfulqa,mmlu",
                          attacks="plain", limit=limit, max_chars=300, num_safety_tokens=num_safety_tokens,
                          batch_size=16, max_answer_tokens=4)
    dm.setup()
    m = SafeVLM(stage=1, num_safety_tokens=num_safety_tokens, feature_layer=feature_layer, lr=lr)
    m.attach(t)
    opt = m.configure_optimizers()
    for ep in range(epochs):
        t0, cl, ll = time.time(), [], []
        for b in dm.train_dataloader():
            cls, _, lm, _ = m.losses(b, lm=True)
            loss = lm + 10 * cls
            opt.zero_grad()
            loss.backward()
            opt.step()
            cl.append(float(cls))
            ll.append(float(lm))
        s = m.split_scores(dm, "test")
        y = [r["label"] for r in dm.split_rows("test")]
        print(ep, sum(cl) / len(cl), sum(ll) / len(ll), roc_auc_score(y, s), time.time() - t0, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(script_main(run))
