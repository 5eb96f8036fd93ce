"""Data layer: dataset readers, the uint8 cache, the on-device loader and DSA augmentation."""
