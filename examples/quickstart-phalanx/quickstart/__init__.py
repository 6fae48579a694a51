"""quickstart-phalanx: a Flower App of its own that uses Phalanx's robust server."""
