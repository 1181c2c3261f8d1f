"""Where a model comes from: one loader for folders, Hub repositories, training runs and the released model; the
BiomedCLIP conversion and adapter files it builds on."""
