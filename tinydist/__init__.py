"""tinydist: resnet18 on Tiny ImageNet under Hugging Face Accelerate, preemption-proof."""

__version__ = "0.1.0"
