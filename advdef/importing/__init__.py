"""Bring your own model: register a run from a checkpoint file or a model factory (`advdef import`).

`checkpoint_files` reads weight files safely (safetensors, or `torch.load(weights_only=True)`:
never unpickling code) and normalises their key layouts; `models` builds factory models inside
advdef's [0,1]-input `Classifier` contract; `runs` writes an ordinary advdef checkpoint and store
row, so `evaluate`, `attack` and `report` treat the imported run like a trained one.
"""
