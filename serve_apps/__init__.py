"""Ray Serve applications (the recommender endpoint and its ``serve deploy`` YAML) live here."""
