"""Data: sources, the decode-once uint8 cache, the global sampler, augmentation and mixing on the device, prefetch."""
