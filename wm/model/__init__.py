"""The networks and their math, with no Lightning: layers and initialisation, distributions, the
RSSM, encoder and decoder, returns, slow (EMA) copies, the optimiser, the size presets, the input
augmentation and the update's timed phases. Imports nothing else of wm."""
