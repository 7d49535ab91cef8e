"""The trainer's side of the swarm: the stage directory it reads from the DHT, the routing policy that picks a
peer per hop, the session that adopts the run's config, and the trainer loop that keeps microbatches in flight."""
