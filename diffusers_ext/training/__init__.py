"""Training the spatial adapter with accelerate: the trainer (``python -m diffusers_ext.training.train_spatial_adapter``,
console script ``train-spatial-adapter``), the unit it hands to ``accelerator.prepare`` and its run folder.

Like diffusers' ``examples/``: a user imports the library at ``diffusers_ext``; this package is the script.
"""
