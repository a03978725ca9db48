"""SPIN itself, readable alone: the decoder (model.py), the KV-cache sampler (sampling.py),
the sequence log-probs and the SPIN loss (loss.py), the noise draws (noise.py), LoRA's
adapter maths (lora.py) and the optimizer's compiled update (optim.py). These modules
import only torch, the standard library and each other (tests/test_layers.py checks it)."""
