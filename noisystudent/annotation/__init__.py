"""Choosing images for people to label, exporting them to annotation tools, and importing the answers."""
