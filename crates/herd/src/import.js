// herd import: loads a PM2 ecosystem file (path in argv[1]) and prints its apps as JSON.
// Run by `herd import` as `node -e <this> FILE`, no shell.
'use strict';
const path = require('path');
const url = require('url');
(async () => {
  const file = path.resolve(process.argv[1]);
  let loaded;
  try {
    loaded = require(file);
  } catch (e) {
    if (e && (e.code === 'ERR_REQUIRE_ESM' || e.code === 'ERR_REQUIRE_ASYNC_MODULE')) {
      loaded = (await import(url.pathToFileURL(file).href)).default;
    } else {
      throw e;
    }
  }
  if (loaded && loaded.default && !loaded.apps) loaded = loaded.default;
  const apps = Array.isArray(loaded) ? loaded : loaded && loaded.apps;
  if (!Array.isArray(apps)) {
    throw new Error('the file exports no apps: expected module.exports = { apps: [...] }');
  }
  process.stdout.write(JSON.stringify(apps, (k, v) =>
    typeof v === 'function' ? '[function]' : v instanceof RegExp ? String(v) : v));
})().catch((e) => {
  process.stderr.write(String(e && e.stack || e) + '\n');
  process.exit(1);
});
