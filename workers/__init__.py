"""Ray Data actor-pool operators holding the Stage C and Stage B/A halves of `cascade` (thin: load once, no maths)."""
