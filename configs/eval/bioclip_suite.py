"""The BioCLIP evaluation suite: nine Meta-Album / benchmark tasks plus Rare Species.

    python -m bioclip_jax.evaluate --config=configs/eval/bioclip_suite.py:/data/bioclip_eval \\
        --pretrained=local-dir:/models/bioclip

ARG is the root holding one folder per task (default ./data/eval):

    ROOT/birds525/<class>/*.jpg        Birds 525
    ROOT/plankton/<class>/*.jpg        Meta-Album Plankton (PLK_Mini)
    ROOT/insects/<class>/*.jpg         Meta-Album Insects (INS_Mini)
    ROOT/insects2/<class>/*.jpg        Meta-Album Insects 2 (INS_2_Mini)
    ROOT/plantnet/<class>/*.jpg        Meta-Album PlantNet (PLT_NET_Mini)
    ROOT/fungi/<class>/*.jpg           Meta-Album Fungi (FNG_Mini)
    ROOT/plantvillage/<class>/*.jpg    Meta-Album PlantVillage (PLT_VIL_Mini); if this folder is
                                       absent, TFDS `plant_village` (prepared in --tfds-data-dir) is used
    ROOT/medicinal_leaf/<class>/*.jpg  Meta-Album Medicinal Leaf (MED_LF_Mini)
    ROOT/plantdoc/<class>/*.jpg        Meta-Album PlantDoc (PLT_DOC_Mini)
    ROOT/rare_species/<class>/*.jpg    Rare Species (400 IUCN species x 30 images)

Each folder may hold a taxa.csv (kingdom, phylum, class, order, family, genus, species,
common, and optionally class_name = the directory name) so classes can be named in any
text type and scored per rank; BioCLIP's own per-task metadata.csv files give these
columns. A task whose folder is missing is reported and skipped. The BioCLIP paper
scores BioCLIP with taxon_com names and CLIP/OpenCLIP with common names.
"""

import os

from bioclip_jax.evaluate.config import default_config

TASKS = ("birds525", "plankton", "insects", "insects2", "plantnet", "fungi", "plantvillage",
         "medicinal_leaf", "plantdoc", "rare_species")
TFDS_FALLBACK = {"plantvillage": "tfds:plant_village:train"}


def get_config(arg=None):
    root = arg or os.path.join("data", "eval")
    config = default_config()
    config.tasks = "zero_shot,few_shot"
    config.text_type = "taxon_com"
    config.shots = (1, 5)
    config.trials = 5
    config.out = "results/bioclip_suite.json"
    datasets = []
    for task in TASKS:
        folder = os.path.join(root, task)
        data = f"folder:{folder}"
        if not os.path.isdir(folder) and task in TFDS_FALLBACK:
            data = TFDS_FALLBACK[task]
        datasets.append({"name": task, "data": data, "taxa": "", "label_key": ""})
    config.datasets = datasets
    return config
