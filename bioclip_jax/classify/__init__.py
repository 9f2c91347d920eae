"""Classifying images with a CLIP model: labels and their scores, tree-of-life ranks, the
pybioclip-shaped classifiers and archive-scale prediction runs."""
