"""segpipe: compare U-Net variants for binary segmentation of LabelMe-annotated images."""

__version__ = "0.1.0"


class SegpipeError(Exception):
    """An error in the user's input or configuration.

    The message names the offending file or key; the CLI prints it without a traceback.
    """
