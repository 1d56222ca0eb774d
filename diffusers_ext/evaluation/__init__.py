"""Layout evaluation of the spatial adapter (``python -m diffusers_ext.evaluation.evaluate``, console script
``evaluate-spatial-adapter``): the detector interface, the layout scores and the toy-world scorer the demo uses.
"""
