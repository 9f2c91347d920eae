"""The embedded default: a tiny CLIP on the synthetic tree of life, minutes on a laptop CPU.

    python -m bioclip_jax.train --config=configs/synthetic_tiny.py --workdir=runs/tiny
Size arguments: `configs/synthetic_tiny.py:smoke` (a few steps, for tests).
"""

from bioclip_jax.train.config_base import base_config, sized


def get_config(arg=None):
    c = base_config()
    c.model.name = "ViT-Tiny-8"
    # 12,800 pairs (1.8 epochs) in 200 updates of 64: more, smaller updates learn more from the same pairs
    # (benchmarks/README.md, "The main job", has the measurements).
    c.total_steps = 200
    c.log_every_steps = 25
    c.data.batch_size = 64
    c.data.text_type = "random"
    c.data.text_tokens = 48  # the longest synthetic caption of the random pool is 43 tokens
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.1
    c.schedule.warmup_steps = 30
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 2
    c.eval.every_steps = 100  # one evaluation half-way, then the final one
    c.eval.batch_size = 128
    c.eval.text_type = "taxon_com,sci,com"
    return sized(c, arg, {
        "smoke": {"total_steps": 6, "data.batch_size": 16, "log_every_steps": 1, "schedule.warmup_steps": 2,
                  "checkpoint.every_steps": 3, "eval.every_steps": 0, "checkpoint.async_save": False,
                  "data.workers": 0},  # tiny batches: decoding in the main process beats starting a worker
    })
