"""Getting data in: a user's own images into shards, shards checked as training reads them, tar to ArrayRecord."""
