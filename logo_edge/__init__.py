"""logo-edge: instance-level LoRA routing (LoGo) on llama.cpp."""
