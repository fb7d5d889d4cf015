"""Quickstart, step 1: train a CIFAR ResNet-20 backbone on digits 0-4 (offline, under a minute).

Data: scikit-learn's bundled 8x8 handwritten digits, upsampled to 16x16 (no download).

Command:
  python -m vision_jax.main --config=configs/digits_pretrain.py \
      --workdir=/tmp/vj_quickstart/pretrain

Expected result (2 CPU cores, about 40 s): eval/top1 1.0 on the 193 held-out digits 0-4 after
300 steps.
"""

from ml_collections.config_dict import placeholder

from vision_jax.config import default_config


def get_config(arg=None):
    if arg:
        raise ValueError(f"this config has no variants; got {arg!r}.")
    c = default_config()
    c.model.name = "cifar_resnet20"
    c.data.source = "digits"
    c.data.classes = (0, 1, 2, 3, 4)
    c.input.image_size = 16
    c.input.random_crop = False
    c.input.flip = False  # digits are not mirror-symmetric
    c.batch_size = 64
    c.eval_batch_size = 128
    c.total_epochs = placeholder(float)
    c.total_steps = 300
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.1
    c.optimizer.weight_decay = 5e-4
    c.schedule.warmup_steps = 20
    c.log_every_steps = 50
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 100
    return c
