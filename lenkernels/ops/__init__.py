"""One module per op family: argument checks, torch.library registration and backend dispatch."""
