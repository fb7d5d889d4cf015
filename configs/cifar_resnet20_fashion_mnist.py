"""Transfer: the CIFAR-10 ResNet-20 of ../shared/weights fine-tuned on 1,200 Fashion-MNIST images.

Variants (the config argument): ``pretrained`` (default; resnet20-12fca82f.th, head replaced) and
``scratch`` (random initialisation), same data, preprocessing (28 -> 32 px, gray -> RGB, ImageNet
mean/std as the weights expect) and budget (150 steps of 64 images, about 8 epochs).

Commands (from the repository root, ../shared beside it):
  python -m vision_jax.main --config=configs/cifar_resnet20_fashion_mnist.py:pretrained \
      --workdir=/tmp/vj_fashion/pretrained
  python -m vision_jax.main --config=configs/cifar_resnet20_fashion_mnist.py:scratch \
      --workdir=/tmp/vj_fashion/scratch

Expected results (eval/top1 on 2,000 held-out test images, 2 CPU cores):
  pretrained  0.834 (36 s)
  scratch     0.690 (37 s)
(wall time of the whole command, measured on 2026-12-05 on a 2-core Intel Xeon, in this order,
sharing the compilation cache beside the workdirs). The CIFAR-10 features transfer to
Fashion-MNIST: 14 points better than random initialisation with the same 150 steps.
"""

from ml_collections.config_dict import placeholder

from vision_jax.config import default_config

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def get_config(arg=None):
    variant = arg or "pretrained"
    if variant not in ("pretrained", "scratch"):
        raise ValueError(f"Unknown variant {variant!r}; valid: pretrained, scratch.")
    c = default_config()
    c.model.name = "cifar_resnet20"
    c.init.path = "../shared/weights/resnet_cifar10/resnet20-12fca82f.th"
    c.init.replace_head = True  # 10 CIFAR classes -> 10 Fashion-MNIST classes: a new head
    c.data.source = "idx"
    c.data.root = "../shared/data/fashion_mnist"
    c.data.class_names = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                          "Shirt", "Sneaker", "Bag", "Ankle boot")  # fmt: skip
    c.data.train_split = "train[:2%]"  # 1,200 images
    c.data.eval_split = "test[:20%]"  # 2,000 images
    c.input.image_size = 32
    c.input.random_crop = True
    c.input.crop_padding = 4
    c.input.flip = True
    c.input.mean, c.input.std = IMAGENET_MEAN, IMAGENET_STD
    c.batch_size = 64
    c.eval_batch_size = 200
    c.total_epochs = placeholder(float)
    c.total_steps = 150
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.optimizer.weight_decay = 5e-4
    c.schedule.warmup_steps = 10
    c.log_every_steps = 50
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 150
    c.keep_checkpoints = 1
    if variant == "scratch":
        c.init.path = None
        c.init.replace_head = False
    return c
