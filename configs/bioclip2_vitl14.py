"""BioCLIP 2's recipe: ViT-L/14, TreeOfLife-200M, with experience replay of general image-caption pairs.

Per-GPU batch 2,816 on 32 GPUs (global 90,112), lr 1e-4, 1,875 warm-up steps, 30 epochs.
Initialise from LAION-2B ViT-L-14 weights with --config.init=local-dir:PATH.
Each batch also holds 320 replay pairs per GPU (10,240 in all) with their own contrastive
loss through a second visual projector (`visual.replay_proj`); give their shards (e.g. LAION,
.jpg + .txt) with --config.data.replay_shards=PATTERN. Under optimizer.accumulate_steps the
replay rows are split into the micro-batches too, so the update is still the whole batch's.
The paper trained in pure bf16; here the towers compute in bfloat16 while parameters and
optimiser state stay float32 (mixed precision).
Size arguments: `:local` shrinks the batch and steps, without replay, so it runs on one machine.
"""

from bioclip_jax.train.config_base import base_config, sized

TREE_OF_LIFE_200M_IMAGES = 214_000_000
GPUS = 32
GLOBAL_BATCH = 2816 * GPUS
REPLAY_PER_BATCH = 320 * GPUS
EPOCHS = 30


def get_config(arg=None):
    c = base_config()
    c.model.name = "ViT-L-14"
    c.data.batch_size = GLOBAL_BATCH
    c.data.text_type = "random"
    c.data.replay_per_batch = REPLAY_PER_BATCH
    c.data.replay_caption = "txt"
    c.total_steps = EPOCHS * TREE_OF_LIFE_200M_IMAGES // GLOBAL_BATCH
    c.optimizer.lr = 1e-4
    c.schedule.warmup_steps = 1875
    c.dtype = "bfloat16"
    c.remat = "full"
    c.mesh.data, c.mesh.fsdp = -1, 8
    c.checkpoint.every_steps = 1000
    c.hardware.devices, c.hardware.device_memory = 32, "80GB"  # the paper's 32 GPUs (80 GB class)
    c.log_every_steps = 50
    return sized(c, arg, {
        "local": {"data.batch_size": 16, "total_steps": 20, "schedule.warmup_steps": 5,
                  "checkpoint.every_steps": 10, "dtype": "float32", "mesh.fsdp": 1, "log_every_steps": 5,
                  "data.replay_per_batch": 0,
                  "hardware.devices": 0},
    })
