"""medseg-diff: conditional diffusion 3D U-Net for brain-tumour segmentation of multi-modal MRI."""

__version__ = "0.1.0"
