import copy, sys, time, statistics
import torch
torch.set_num_threads(1)
from bench.bench_train import load_base, adapt, fill_lora_b, peft_lora_model, TrainStep, run_spec, LORA_PARAMS
from bench.common import fixed_text_batch, interleaved_times, ratio_stats
from engine.methods.lora import LoRALinear

class FusedLoRALinear(LoRALinear):
    def forward(self, x):
        # scaling on the r-wide intermediate; base output and update summed by one addmm
        h = torch.nn.functional.linear(x, self.lora_A.weight) * self.scaling
        base = torch.nn.functional.linear(x, self.base.weight)
        shp = base.shape
        out = torch.addmm(self.base.bias, h.reshape(-1, h.shape[-1]), self.lora_B.weight.t()) if False else None
        y = torch.addmm(self.base.bias, x.reshape(-1, shp[-1] if False else x.shape[-1]), self.base.weight.t())
        y = torch.addmm(y, h.reshape(-1, h.shape[-1]), self.lora_B.weight.t())
        return y.view(*shp[:-1], -1)

class ScaledRLoRALinear(LoRALinear):
    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x) * self.scaling)

base, tok = load_base()
batch = fixed_text_batch(tok, 16, 64, torch.device("cpu"))
ours = copy.deepcopy(base); adapt(ours, "lora", LORA_PARAMS); fill_lora_b(ours)
ref = peft_lora_model(copy.deepcopy(base), ours)
def variant(cls):
    m = copy.deepcopy(ours)
    for n, l in list(m.named_modules()):
        if isinstance(l, LoRALinear):
            l.__class__ = cls
    return m
fused = variant(FusedLoRALinear); scaled = variant(ScaledRLoRALinear)
for m in (ours, fused, scaled):
    m.eval()
with torch.no_grad():
    print("fused diff", (fused(batch)-ours(batch)).abs().max().item(), "scaled diff", (scaled(batch)-ours(batch)).abs().max().item())
spec = run_spec("lora", LORA_PARAMS)
steps = {"peft": TrainStep(ref, None, batch, spec), "ours": TrainStep(ours, None, batch, spec),
         "fused": TrainStep(fused, None, batch, spec), "scaled_r": TrainStep(scaled, None, batch, spec)}
t = interleaved_times(steps, reps=int(sys.argv[1]), warmup=1, clock="cpu")
for k in ("ours", "fused", "scaled_r"):
    print(k, "/ peft", ratio_stats(t[k], t["peft"]))
print({k: statistics.median(v) for k, v in t.items()})
