"""The model layer: chat and embedding models behind small interfaces, and how they are loaded."""
