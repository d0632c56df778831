// An app that forks its own Node cluster and has no worker branch of its own:
//   PORT=3000 herd run -i 2 bench/compat/apps/cluster_fork.js
// Run alone, it is the primary and forks two children that serve. Under herd it is itself a
// cluster worker (herd is the primary), so `cluster.isPrimary` is false and it does nothing:
// nothing listens. bench/compat.py records what herd makes of that (issue #11, item 3).
const cluster = require('cluster');
const path = require('path');
if (cluster.isPrimary) {
  cluster.setupPrimary({ exec: path.join(__dirname, 'cluster_fork_child.js') });
  for (let i = 0; i < 2; i++) cluster.fork();
}
