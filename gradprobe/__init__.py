"""gradprobe: will this network train from this initialization?"""

__version__ = "0.1.0"
