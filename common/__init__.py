"""Ground floor: file and weight plumbing that vision_tokenizers/, models/ and everything above share."""
