# Trial only (fourteenth session): FP8 backward GEMMs with fast accumulation (TE's _2X_ACC_DGRAD/_WGRAD = False)
# in every Python process started with this folder first on PYTHONPATH.
import importlib

for name in ("linear", "layernorm_linear", "layernorm_mlp"):
    module = importlib.import_module(f"transformer_engine.pytorch.module.{name}")
    module._2X_ACC_DGRAD = False
    module._2X_ACC_WGRAD = False
print("trial: FP8 dgrad/wgrad GEMMs with fast accumulation", flush=True)
