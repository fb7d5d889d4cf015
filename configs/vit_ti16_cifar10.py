"""Transfer: the pretrained ViT-Ti/16 of ../shared/weights fine-tuned on 2,000 CIFAR-10 images.

Variants (the config argument), all with the same data, resolution (112 px: position embeddings
resampled from 14x14 to 7x7) and a budget of 150 steps of 32 images:

  pretrained    full fine-tune from ViT-Ti_16.npz (head replaced), SGD with momentum
  scratch       the same run from random initialisation
  lora          LoRA rank 8 on the query and value projections, plus the head (AdamW)
  linear_probe  the head alone on the frozen pretrained backbone (AdamW)
  layer_decay   full fine-tune with layer-wise learning-rate decay 0.75 (AdamW)
  select        pretrained, for up to 400 steps, validated every 25 steps on 500 other training
                images (train[4%:5%]); the best checkpoint is kept, training stops after 3
                validations without improvement, and the best is tested at the end

Commands (from the repository root, ../shared beside it):
  unzip -q ../shared/data/cifar10_jpeg/cifar10_jpeg.zip -d /tmp/cifar10_jpeg
  python -m vision_jax.main --config=configs/vit_ti16_cifar10.py:pretrained \
      --workdir=/tmp/vj_cifar/pretrained
  (the same with :scratch, :lora, :linear_probe, :layer_decay and their own workdirs)
  python -m vision_jax.main --config=configs/vit_ti16_cifar10.py:select \
      --workdir=/tmp/vj_cifar/select

Expected results (eval/top1 on 1,000 held-out test images, 2 CPU cores):
  variant        eval/top1  trainable params  optimizer state  wall time
  pretrained       0.749        5,498,122         21.0 MiB         62 s
  scratch          0.258        5,498,122         21.0 MiB         65 s
  lora             0.742           75,658          0.6 MiB         56 s
  linear_probe     0.640            1,930          0.0 MiB         25 s
  layer_decay      0.736        5,498,122         41.9 MiB         65 s
(wall time of the whole command: loading, 150 steps, evaluation, the report; measured on
2026-12-05 on a 2-core Intel Xeon, in this order, the workdirs side by side, so that the
later runs find the earlier ones' compiled programs in the shared cache beside them; images
resized as PIL resamples 8-bit images: before that change, on a 2-core AMD EPYC, 0.751 /
0.255 / 0.742 / 0.644 / 0.739).
  select: the best validation (val/top1 0.828 on the 500 validation images) came at step 325 of
  400; that checkpoint scores eval/top1 0.806 on the 1,000 test images (the validations after
  it, the last at the last step, did not beat it: 0.826, then 0.828 twice, ties keeping the
  earlier step). Wall time 175 s.
The pretrained backbone wins by 49 points over the same run from scratch; LoRA gets within a
point of full fine-tuning while training 1.4% of the parameters.
"""

from ml_collections.config_dict import placeholder

from vision_jax.config import default_config

VARIANTS = ("pretrained", "scratch", "lora", "linear_probe", "layer_decay", "select")


def get_config(arg=None):
    variant = arg or "pretrained"
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; valid: {', '.join(VARIANTS)}.")
    c = default_config()
    c.model.name = "vit_ti16"
    c.init.path = "../shared/weights/vit_ti16/ViT-Ti_16.npz"  # 200-way Tiny-ImageNet head
    c.init.use_input_contract = True  # mean/std 0.5 (pixels to [-1, 1]), as the weights expect
    c.data.source = "imagefolder"
    c.data.root = "/tmp/cifar10_jpeg"
    c.data.train_split = "train[:4%]"  # 2,000 images, class-balanced slice of a fixed shuffle
    c.data.eval_split = "test[:10%]"  # 1,000 images
    c.input.image_size = 112
    c.input.random_crop = True
    c.input.crop_padding = 14  # CIFAR-style: pad 4/32 of the side, then crop
    c.batch_size = 32
    c.eval_batch_size = 100
    c.total_epochs = placeholder(float)
    c.total_steps = 150
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.01
    c.optimizer.weight_decay = 0.0
    c.schedule.warmup_steps = 15
    c.log_every_steps = 25
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 150
    c.keep_checkpoints = 1
    if variant == "scratch":
        c.init.path = None
        c.init.use_input_contract = False
    elif variant == "lora":
        c.lora.rank = 8
        c.lora.alpha = 8.0
        c.optimizer.name = "adamw"
        c.optimizer.learning_rate = 2e-3
    elif variant == "linear_probe":
        c.optimizer.trainable = "head"
        c.optimizer.name = "adamw"
        c.optimizer.learning_rate = 5e-3
    elif variant == "layer_decay":
        c.optimizer.name = "adamw"
        c.optimizer.learning_rate = 3e-4
        c.optimizer.weight_decay = 0.05
        c.optimizer.layer_decay = 0.75
    elif variant == "select":
        c.data.val_split = "train[4%:5%]"  # 500 training images the run does not train on
        c.total_steps = 400
        c.eval_every_steps = c.checkpoint_every_steps = 25
        c.early_stopping.patience = 3
    return c
