"""What a run leaves behind, and how it travels: saved.py (`final/`: weights, classes, preprocess),
export.py (a Hub-ready folder), card.py (the model card), provenance.py, hub.py (push and
`load_model`), plain.py (an nn.Module on RGB in [0, 1] for RobustBench). It imports the library and
the training / evaluation app, never ft_focal.commands.
"""
