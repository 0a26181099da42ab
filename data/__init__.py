"""Data stage: synthetic CT phantoms, dataset layouts (MSD, nnU-Net v2), input checks, transforms."""
