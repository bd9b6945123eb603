"""Does SafeVLM's safety head learn? SmolLM2-135M, AdvBench/HarmBench/Do-Not-Answer vs TruthfulQA/MMLU,
plain prompts <= 300 chars, 160 rows, a *random* split (nothing held out: an in-distribution check,
not a generalisation figure); stage-I losses (LM + 10 x classifier) by hand, test AUROC per epoch.

    python experiments/safevlm_head_check.py
"""
import torch, time
torch.set_num_threads(2)
from lit_sahs.safevlm import SafeVLM, SafetyDataModule
from lit_sahs.targets import load_target
from sklearn.metrics import roc_auc_score
t=load_target("smollm2-135m-instruct")
dm=SafetyDataModule(target=t, harmful="advbench,harmbench,donotanswer", benign="truthfulqa,mmlu", attacks="plain", limit=160, max_chars=300, num_safety_tokens=8, batch_size=16, max_answer_tokens=4)
dm.setup()
m=SafeVLM(stage=1, num_safety_tokens=8, feature_layer=15, lr=3e-3); m.attach(t)
opt=m.configure_optimizers()
for ep in range(3):
    t0=time.time(); cl=[]; ll=[]
    for b in dm.train_dataloader():
        cls,_,lm,_=m._losses(b, lm=True); loss=lm+10*cls; opt.zero_grad(); loss.backward(); opt.step(); cl.append(float(cls)); ll.append(float(lm))
    s=m.split_scores(dm,"test"); y=[r["label"] for r in dm.split_rows("test")]
    print(ep, sum(cl)/len(cl), sum(ll)/len(ll), roc_auc_score(y,s), time.time()-t0, flush=True)
