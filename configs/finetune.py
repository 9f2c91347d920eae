"""Fine-tuning a pretrained BioCLIP on your own images (shards from `bioclip-jax make-shards`).

    bioclip-jax make-shards --folder photos/ --output data/mine
    bioclip-jax train --config=configs/finetune.py --workdir=runs/mine \\
        --config.data.train_shards=data/mine/train \\
        --config.eval.held_out_dir=data/mine/held_out/images --config.eval.taxa_file=data/mine/held_out/taxa.csv

Starts from `config.init`, any model source: hf-hub:imageomics/bioclip-2 (the default,
ViT-L-14), hf-hub:imageomics/bioclip (`configs/finetune.py:bioclip`, ViT-B-16-quickgelu),
local-dir:PATH (an open_clip folder, e.g. one `bioclip-jax export` wrote) or a bioclip_jax
training workdir (its latest finished step). `config.model.name` must name the source's
architecture (a mismatch is refused with both names).

The recipe is open_clip fine-tuning practice (WiSE-FT, FLYP) scaled to a collection of a
few thousand images: lr 1e-5 (a tenth of BioCLIP's pre-training lr) after 100 warm-up steps,
cosine to 0, batch 64, weight decay 0.1, the same contrastive loss and random caption type
per batch as pre-training, so scientific, taxonomic and common-name queries all keep working.
`--config.optimizer.freeze=image` (or `text`) trains one tower only (LiT): the frozen tower
keeps its weights bit for bit and costs no optimiser memory.
Size arguments: `:bioclip` starts from BioCLIP (v1) instead of BioCLIP 2.
"""

from bioclip_jax.train.config_base import base_config, sized

BIOCLIP_2 = "hf-hub:imageomics/bioclip-2"
BIOCLIP = "hf-hub:imageomics/bioclip"


def get_config(arg=None):
    c = base_config()
    c.init = BIOCLIP_2
    c.model.name = "ViT-L-14"
    c.total_steps = 1000
    c.log_every_steps = 10
    c.dtype = "bfloat16"            # parameters and optimiser state stay float32
    c.remat = "full"                # recompute activations: less memory for ViT-L-14 on one GPU
    c.data.batch_size = 64
    c.data.text_type = "random"
    c.optimizer.lr = 1e-5
    c.optimizer.weight_decay = 0.1
    c.optimizer.freeze = ""         # "image" | "text": train the other tower only
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 100
    c.checkpoint.every_steps = 200
    c.checkpoint.keep = 2
    c.eval.every_steps = 200
    c.eval.batch_size = 64
    c.eval.text_type = "taxon_com,sci,com"
    return sized(c, arg, {
        "bioclip": {"init": BIOCLIP, "model.name": "ViT-B-16-quickgelu"},  # OpenAI-initialised: QuickGELU
    })
