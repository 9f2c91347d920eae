"""BioCLIP v1's published recipe (CVPR 2024), exactly.

ViT-B/16 with QuickGELU initialised from OpenAI CLIP weights (pass them with
--config.init=local-dir:/path/to/openai-ViT-B-16), TreeOfLife-10M, global batch 32,768,
AdamW (0.9, 0.98, eps 1e-6), weight decay 0.2 except gains/biases/logit_scale, lr 1e-4,
1000 warm-up steps, cosine to 0 over 100 epochs, one text type drawn per batch,
gradient checkpointing.
Size arguments: `:local` shrinks the batch and steps so the same config runs on one machine.
"""

from bioclip_jax.train.config_base import base_config, sized

TREE_OF_LIFE_10M_TRAIN_IMAGES = 9_924_000  # approximate size of the published train split
GLOBAL_BATCH = 32_768
EPOCHS = 100


def get_config(arg=None):
    c = base_config()
    c.model.name = "ViT-B-16-quickgelu"
    c.data.batch_size = GLOBAL_BATCH
    c.data.text_type = "random"
    c.total_steps = EPOCHS * TREE_OF_LIFE_10M_TRAIN_IMAGES // GLOBAL_BATCH
    c.optimizer.lr = 1e-4
    c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.98, 1e-6
    c.optimizer.weight_decay = 0.2
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 1000
    c.remat = "full"
    c.dtype = "bfloat16"  # the reference used fp16 AMP; bf16 is the TPU/Ampere equivalent
    c.mesh.data, c.mesh.fsdp = -1, 1
    c.checkpoint.every_steps = 500
    c.hardware.devices, c.hardware.device_memory = 8, "80GB"  # the paper's 8 A100-80GB
    c.log_every_steps = 50
    return sized(c, arg, {
        "local": {"data.batch_size": 64, "total_steps": 100, "schedule.warmup_steps": 10,
                  "checkpoint.every_steps": 50, "dtype": "float32", "log_every_steps": 5,
                  "hardware.devices": 0},
    })
