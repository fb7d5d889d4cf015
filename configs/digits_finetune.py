"""Quickstart, step 2: fine-tune the step-1 backbone on digits 5-9 with a new head.

The label set is new, so the head is replaced (``init.replace_head``) and starts at zero: accuracy
before fine-tuning is chance (0.2); the backbone features transfer, so a short fine-tune is enough.

Command (after step 1):
  python -m vision_jax.main --config=configs/digits_finetune.py \
      --workdir=/tmp/vj_quickstart/finetune --config.init.path=/tmp/vj_quickstart/pretrain

Expected result (2 CPU cores, about 30 s): eval_before/top1 0.19 (chance is 0.2), eval/top1 0.97
on the 167 held-out digits 5-9 after 100 steps.
"""

from ml_collections.config_dict import placeholder

from vision_jax.config import default_config


def get_config(arg=None):
    if arg:
        raise ValueError(f"this config has no variants; got {arg!r}.")
    c = default_config()
    c.model.name = "cifar_resnet20"
    c.init.path = placeholder(str)  # set on the command line: the step-1 workdir
    c.init.replace_head = True
    c.data.source = "digits"
    c.data.classes = (5, 6, 7, 8, 9)
    c.input.image_size = 16
    c.input.random_crop = False
    c.input.flip = False
    c.batch_size = 64
    c.eval_batch_size = 128
    c.total_epochs = placeholder(float)
    c.total_steps = 100
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.02
    c.optimizer.weight_decay = 5e-4
    c.schedule.warmup_steps = 10
    c.log_every_steps = 25
    c.eval_every_steps = 0
    c.eval_before_training = True
    c.checkpoint_every_steps = 50
    return c
