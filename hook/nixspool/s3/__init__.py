"""A binary cache in a bucket of an S3-compatible object store (AWS S3, R2, B2,
SeaweedFS, Garage, MinIO, Ceph RGW), written through boto3 (`nixspool[s3]`).

The URL is Nix's own: s3://BUCKET[/PREFIX]?endpoint=HOST[:PORT]&scheme=http|https
&region=R&profile=P (a full URL in `endpoint` works too), so a URL a user already
has keeps its meaning. Credentials come from boto3's own chain, in the writer's
process, which runs as the configured user: their ~/.aws/credentials and
`profile`, or the AWS_* environment the unit gives nixspool. Never read by root,
never printed, never on a command line.

How it keeps the cache whole (cache_files.py has what every place promises):
- an object appears whole or not at all, so a NAR is made into a temporary
  file here (its name is its compressed hash, known only at the end) and then
  PUT under that name; a large one goes up as a multipart upload, which only
  appears when it completes. One a killed writer left is aborted by a later
  upload once it is a day old.
- several builders, one bucket: a narinfo is written with `If-None-Match: *`;
  where one is there already, our signatures are added to it by a
  read-modify-write guarded by `If-Match: <its ETag>`, tried again when another
  writer won the race. A store that ignores conditional writes is found out once
  per upload (a probe object written twice) and said so: there, two builders
  writing one path at the same moment may keep only one's signature.
- which narinfos are there: one listing (1,000 names per request) while that is
  cheaper than a HEAD per path to write, else a HEAD per path.
"""

from .bucket import BucketFiles
from .connect import Location

__all__ = ["BucketFiles", "Location"]
