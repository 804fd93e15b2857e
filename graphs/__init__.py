"""Graphs: the GCN baseline, IsoC-VGAE and SelfTask graph self-supervision."""
