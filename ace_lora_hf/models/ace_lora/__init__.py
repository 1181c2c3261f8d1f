"""ACE-LoRA's remote-code set: configuration, model, processor, pipeline and what they need. The files import only
each other (relatively), so the folder ships flat to a Hub repository and loads there with trust_remote_code."""
