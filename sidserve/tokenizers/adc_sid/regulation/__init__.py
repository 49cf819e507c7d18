"""Collision regulation (AdaSID-style), one stage per module: ``overlaps`` finds items whose
SIDs are identical or within Hamming h, ``pairs`` turns them into weighted pairs,
``repulsion`` holds the equations (compatibility, load, schedule, the repulsion term)."""
