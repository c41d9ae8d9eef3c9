"""ichnode's own package: the command line that joins node, worker and training (`ichnode.cli`),
and the layer all three share (`ichnode.common`)."""
