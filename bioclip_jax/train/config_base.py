"""Every field a training config has, with defaults; configs/*.py change what they need.

The config is locked after `get_config`, so a misspelt command-line override
(`--config.optimizer.lrr=1e-4`) is an error that names the field.
"""

from __future__ import annotations

import ml_collections

from bioclip_jax.config_fields import override


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 1000            # train-step calls (batches of data.batch_size); each is one optimiser
                                    # update, except under accumulate_mode="independent_microbatches"
    c.log_every_steps = 10
    c.init = ""                     # any pretrained= source; "" = random initialisation
    c.dtype = "float32"             # compute dtype: float32 | bfloat16 (parameters stay float32)
    c.remat = "none"                # backward-pass recomputation of each transformer block: none | full |
                                    # minimal (recompute all but the weight matmuls) | save:NAME,... |
                                    # a jax.checkpoint_policies name (bioclip_jax/models/remat.py)
    c.attention = "auto"            # attention kernel: auto (cuDNN on a GPU in bf16/fp16 where cuDNN runs the
                                    # towers' shapes, xla einsums on other GPUs and on TPUs, head-major einsums
                                    # on CPU) | xla | cudnn | head_major (bioclip_jax/models/attention.py)
    c.compilation_cache_dir = "auto"  # persistent XLA compilation cache: auto (the folder JAX was given, e.g.
                                      # JAX_COMPILATION_CACHE_DIR, else $BIOCLIP_JAX_CACHE/xla or
                                      # ~/.cache/bioclip_jax/xla) | a path (local or gs://) | "" off
    c.scan_layers = True            # run transformer blocks in a lax.scan (faster backward, quicker compile)

    c.model = ml_collections.ConfigDict()
    c.model.name = "ViT-B-16"

    c.data = ml_collections.ConfigDict()
    c.data.train_shards = ""        # brace pattern, e.g. /data/train/shard-{000000..000159}.tar
    c.data.batch_size = 256         # global batch over all hosts and devices
    c.data.text_type = "random"     # fixed type | random | per_sample | weighted "sci:0.5,taxon_com:0.5"
    c.data.text_tokens = 0          # token positions fed to the text tower (0 = the model's 77);
                                    # captions longer than this are truncated (end-of-text kept)
    c.data.workers = -1             # Grain worker processes per host (-1 = sized from the usable CPUs,
                                    # 0 = in the main process)
    c.data.prefetch_to_device = 2   # global batches kept on the devices ahead of the step
    c.data.crop_scale = (0.9, 1.0)  # RandomResizedCrop scale, as in BioCLIP
    c.data.max_bad_fraction = 0.01  # stop when more than this fraction of samples is unusable
    c.data.index_cache_dir = ""     # where shard indexes go when the data directory is read-only
    # BioCLIP 2's experience replay: every global batch also holds replay_per_batch general
    # image-caption pairs (LAION in the paper), scored through a second visual projector.
    c.data.replay_shards = ""       # webdataset pattern of .jpg + caption pairs ("" = no replay)
    c.data.replay_per_batch = 0     # replay pairs per global batch, beside data.batch_size tree-of-life pairs
    c.data.replay_caption = "txt"   # the replay samples' caption member
    c.data.synthetic = ml_collections.ConfigDict()  # generated into WORKDIR/synthetic if no shards
    c.data.synthetic.species = 200
    c.data.synthetic.images_per_species = 40
    c.data.synthetic.held_out_species = 0.1
    c.data.synthetic.image_size = 64
    c.data.synthetic.seed = 0

    c.loss = ml_collections.ConfigDict()
    c.loss.kind = "softmax"         # softmax (CLIP) | sigmoid (SigLIP)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adamw"
    c.optimizer.lr = 1e-4
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.98
    c.optimizer.eps = 1e-6
    c.optimizer.weight_decay = 0.2
    c.optimizer.grad_clip_norm = 0.0   # 0 = no clipping
    c.optimizer.freeze = ""            # "" | image | text: that tower is not trained and has no optimiser state
    c.optimizer.accumulate_steps = 1   # k: split each update's batch into k micro-batches (activations / k)
    c.optimizer.accumulate_mode = "global_negatives"
    # global_negatives: data.batch_size is the batch of one update, with all its negatives; the step
    #   runs it as k micro-batches of batch_size / k (open_clip's accum_freq): same update as one big batch.
    # independent_microbatches: optax MultiSteps over k calls, data.batch_size = one micro-batch; each
    #   sees only its own negatives, a weaker objective than the big batch (not the recipe).

    c.schedule = ml_collections.ConfigDict()
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 1000

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                # -1 = all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.num_devices = 0          # use the first N devices only (0 = all of them)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 1000
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0          # 0 = only at the end
    c.eval.held_out_dir = ""        # image folder (one directory per species) for zero-shot
    c.eval.taxa_file = ""           # taxa.csv for the held-out species (enables per-rank scores)
    c.eval.text_type = "taxon_com"  # comma list, e.g. "taxon_com,com"
    c.eval.batch_size = 256

    c.device_peak_tflops = 0.0      # for MFU; 0 = look up the device kind, unknown -> no MFU

    # The hardware a recipe is meant for: `bioclip-jax plan` simulates it and gives its verdict.
    c.hardware = ml_collections.ConfigDict()
    c.hardware.devices = 0          # accelerators of the whole run (0 = the devices where plan runs)
    c.hardware.device_memory = ""   # usable memory per device, e.g. "80GB" ("" = no verdict)
    return c


def sized(config: ml_collections.ConfigDict, arg: str | None, sizes: dict) -> ml_collections.ConfigDict:
    """Applies a big_vision-style size argument (`config.py:local`) from a table of overrides."""
    if not arg:
        return config
    if arg not in sizes:
        raise ValueError(f"unknown config argument {arg!r}; choose one of {sorted(sizes)}")
    return override(config, sizes[arg], where=f"config size {arg!r}")
