"""The synthetic tree of life and a small caption set: seeded stand-ins for TreeOfLife-10M and LAION."""
