// Fastify 5 under herd: PORT=3000 herd run -i 2 bench/compat/apps/fastify.js
const fastify = require('fastify')();
const me = { pid: process.pid, instance: process.env.HERD_INSTANCE, server: 'fastify' };
fastify.get('/', async () => me);
fastify.listen({ port: Number(process.env.PORT || 3000), host: '127.0.0.1' }, (err) => {
  if (err) { console.error(err); process.exit(1); }
});
